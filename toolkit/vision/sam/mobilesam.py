"""MobileSAM: decoupled distillation of a small image encoder into a SAM.

MobileSAM (Zhang et al., 2023) observes that training a small SAM end to end
couples two hard problems, a weak encoder and a decoder that must adapt to it.
Decoupled, the small encoder is trained alone to reproduce the teacher's image
embeddings (a mean squared error, no masks, no labels) and the teacher's prompt
encoder and mask decoder are then used unchanged, since they already read
embeddings of that form.

The student here is a ``SamVisionEncoder`` of a smaller ``SamVisionConfig``
(fewer, narrower blocks, same input size, patch size and output channels), so
the result is a plain ``SamModel`` whose ``vision_config`` is the student's; it
saves with ``save_pretrained`` and loads with ``SamModel.from_pretrained`` as any
SAM does. With few images, each is seen under several fixed augmentations
(mirror, crop and rescale, colour jitter); the teacher's embeddings of every view
are computed once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.config import Config, check
from toolkit.data.segments import SegImage
from toolkit.errors import ConfigError
from toolkit.progress import Progress, reporter
from toolkit.vision.sam.model import check_images, to_pixels

__all__ = ["DistillConfig", "distill", "student_config"]


@dataclass(frozen=True)
class DistillConfig(Config):
    """Training of the student encoder: ``steps`` of ``batch`` views, ``views`` augmentations per image."""

    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    views: int = 8
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        check(self.steps >= 0 and self.batch >= 1 and self.views >= 1, "steps must be >= 0, batch and views >= 1")
        check(0 < self.lr < math.inf, f"lr must be a positive learning rate, got {self.lr!r}")
        check(self.warmup >= 0, f"warmup must be >= 0 steps, got {self.warmup!r}")
        check(self.threads is None or self.threads >= 0,
              f"threads must be >= 0 (0 or None: torch's), got {self.threads!r}")


def student_config(teacher, hidden: int = 96, layers: int = 4, heads: int = 3, mlp: int | None = None,
                   window: int | None = None, global_attn: tuple[int, ...] | None = None):
    """A ``SamVisionConfig`` for a student of ``teacher``: its input, patch and output sizes, smaller blocks."""
    from transformers import SamVisionConfig

    tv = teacher.config.vision_config
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    return SamVisionConfig(hidden_size=hidden, output_channels=tv.output_channels, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=tv.image_size, patch_size=tv.patch_size,
                           window_size=tv.window_size if window is None else window,
                           global_attn_indexes=list(global_attn if global_attn is not None
                                                    else (layers // 2 - 1, layers - 1)),
                           mlp_dim=mlp if mlp is not None else 4 * hidden, num_pos_feats=tv.num_pos_feats,
                           initializer_range=0.02)


def _views(items: list[SegImage], views: int, seed: int) -> torch.Tensor:
    """``views`` augmentations of every image: the image itself, its mirror, then random crops with jitter."""
    from PIL import Image

    size = items[0].image.shape[0]
    out = []
    for i, it in enumerate(items):
        rng = np.random.default_rng([seed, i, 5])
        for v in range(views):
            img = it.image
            if v % 2:
                img = img[:, ::-1]
            if v >= 2:
                side = int(size * rng.uniform(0.6, 1.0))
                y0, x0 = rng.integers(0, size - side + 1, 2)
                img = np.asarray(Image.fromarray(np.ascontiguousarray(img[y0:y0 + side, x0:x0 + side]))
                                 .resize((size, size), Image.BILINEAR))
                img = np.clip(img.astype(np.float32) * rng.uniform(0.8, 1.2, 3) + rng.uniform(-15, 15), 0, 255)
            out.append(np.ascontiguousarray(img).astype(np.uint8))
    return to_pixels(out)


def distill(teacher, student, config: DistillConfig, images: list[SegImage],
            log: Callable[[dict], None] | None = None, progress: Progress = False):
    """A ``SamModel``: ``teacher`` with its image encoder replaced by ``student``, trained on ``images``.

    ``student`` is a ``SamVisionConfig`` (for example from :func:`student_config`)
    or a ``SamVisionEncoder``. Its embeddings must have the teacher's shape
    (channels and grid), or a ``ValueError`` says which differs. Only the images
    are used, never their masks. ``teacher`` is not changed. ``log`` receives
    ``{"step", "loss"}`` every hundred steps; ``progress`` counts the steps.
    """
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    if not isinstance(config, DistillConfig):
        raise ConfigError(f"config must be a DistillConfig, got {type(config).__name__}")
    if isinstance(student, SamVisionConfig):
        torch.manual_seed(config.seed)
        student = SamVisionEncoder(student)
    if not isinstance(student, SamVisionEncoder):
        raise TypeError("student must be a SamVisionConfig or a SamVisionEncoder")
    size = check_images(teacher, images, "distill")
    t_enc = teacher.vision_encoder.eval()
    probe = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        t_shape = tuple(t_enc(probe).last_hidden_state.shape[1:])
        try:
            s_shape = tuple(student(probe).last_hidden_state.shape[1:])
        except Exception as exc:
            raise ValueError(f"the student cannot read the teacher's {size} x {size} inputs: {exc}") from None
    if s_shape != t_shape:
        raise ValueError(f"the student's embeddings are {s_shape} (channels, height, width), the teacher's "
                         f"{t_shape}: the mask decoder can only read the teacher's shape")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        pixels = _views(images, config.views, config.seed)
        with torch.no_grad():
            target = torch.cat([t_enc(pixels[i:i + 32]).last_hidden_state.to(torch.bfloat16)
                                for i in range(0, len(pixels), 32)])
        std2 = float(target.float().var())
        opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.05)
        rng = np.random.default_rng(config.seed)
        report = reporter(progress, config.steps, "distill")
        student.train()
        for step in range(config.steps):
            if step < config.warmup:
                lr = config.lr * (step + 1) / config.warmup
            else:
                lr = config.lr * 0.5 * (1 + math.cos(math.pi * (step - config.warmup)
                                                     / max(1, config.steps - config.warmup)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.from_numpy(rng.choice(len(pixels), min(config.batch, len(pixels)), replace=False))
            loss = F.mse_loss(student(pixels[idx]).last_hidden_state, target[idx].float()) / std2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            if log is not None and (step % 100 == 0 or step == config.steps - 1):
                log({"step": step, "loss": float(loss.detach())})
            report(step + 1, config.steps)
        student.eval()
    finally:
        torch.set_num_threads(threads)
    from transformers import SamModel

    cfg = copy.deepcopy(teacher.config)
    cfg.vision_config = copy.deepcopy(student.config)
    out = SamModel(cfg)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("vision_encoder.")}
    state.update({f"vision_encoder.{k}": v for k, v in student.state_dict().items()})
    out.load_state_dict(state)
    out.shared_image_embedding.positional_embedding.requires_grad_(False)
    out.config.distill = {"images": len(images), "views": config.views, "steps": config.steps}
    return out.eval()
