"""Train the small SAM (``sam-shapes``) on images with known masks.

``python -m toolkit.recipes.train_sam --out runs/sam --minutes 60``

Every step draws fresh images (:mod:`toolkit.data.segments`, ``split="train"``,
seeds ``step * batch ..``), so the number of distinct training images is
``steps * batch``; compression later uses at most 1% of that. One prompt kind
per step (box, one point, several points, as SAM mixes them), four objects an
image. The loss is :func:`toolkit.vision.sam.loss.mask_loss`: cross-entropy
plus dice on the mask upsampled to the input size, taking for a one-point
prompt only the best of its three masks, plus the squared error of the
predicted IoU against the real one. Checkpoints every few minutes; ``--resume``
continues one; the end writes the model (a plain ``SamModel`` directory with
its ``SamProcessor``, ``OUT/model``, the path ``run`` returns) and a held-out
evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from toolkit.config import Config, check
from toolkit.numerics import cpu_has_bf16
from toolkit.recipes.common import (
    TimeBudget,
    cli,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    set_threads,
    step_progress,
)
from toolkit.vision.sam.loss import mask_loss
from toolkit.vision.sam.model import build_sam, decode, make_processor, sam_config
from toolkit.vision.sam.prompts import KINDS, make_batch

__all__ = ["TrainSamConfig", "run", "main"]

_KIND_P = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class TrainSamConfig(Config):
    """Training of the small SAM from scratch."""

    out: Path = field(metadata={"help": "run directory: checkpoint, history.json and the final model/"})
    steps: int = field(default=8000, metadata={"help": "total steps (the learning-rate schedule's length)"})
    minutes: float | None = field(default=None, metadata={"help": "stop (and save) after this long"})
    batch: int = field(default=16, metadata={"help": "images per step"})
    per_image: int = field(default=4, metadata={"help": "prompted objects per image"})
    lr: float = field(default=8e-4, metadata={"help": "peak learning rate"})
    warmup: int = field(default=200, metadata={"help": "steps of linear warmup"})
    eval_every: int = field(default=1000, metadata={"help": "steps between held-out evaluations"})
    eval_images: int = field(default=128, metadata={"help": "held-out images per evaluation"})
    final_images: int = field(default=500, metadata={"help": "held-out images for the final figures"})
    checkpoint_every: float = field(default=300.0, metadata={"help": "seconds between checkpoints"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    bf16: bool = field(default=True, metadata={
        "help": "bfloat16 autocast (float32 weights); only where the CPU has bf16 instructions"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})

    def __post_init__(self) -> None:
        check(self.steps >= 0 and self.batch >= 1 and self.per_image >= 1 and self.eval_every >= 1,
              "steps must be >= 0, batch, per_image and eval_every >= 1")
        check(self.minutes is None or self.minutes > 0,
              f"minutes must be positive (None: no limit), got {self.minutes}")


class _Batches(torch.utils.data.IterableDataset):
    """Training batches rendered in a worker process; batch ``s`` is a pure function of ``s``."""

    def __init__(self, start: int, steps: int, batch: int, per_image: int, size: int):
        self.start, self.steps, self.batch, self.per_image, self.size = start, steps, batch, per_image, size

    def __iter__(self):
        from toolkit.data.segments import make_image

        for step in range(self.start, self.steps):
            rng = np.random.default_rng([step, 11])
            items = [make_image(step * self.batch + i, "train", self.size) for i in range(self.batch)]
            items = [it for it in items if len(it.masks)] or [make_image(0, "train", self.size)]
            kind = KINDS[rng.choice(len(KINDS), p=_KIND_P)]
            yield step, kind, make_batch(items, kind, self.per_image, rng, train=True)


def run(config: TrainSamConfig) -> Path:
    """Train as ``config`` says; returns the directory of the final model."""
    from tqdm import tqdm

    from toolkit.data.segments import images
    from toolkit.vision.sam.metrics import evaluate

    set_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    model = build_sam(sam_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    step, elapsed, history = 0, 0.0, []
    state = load_checkpoint(ckpt) if config.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    budget = TimeBudget(float("inf") if config.minutes is None else config.minutes * 60, elapsed)
    bf16 = config.bf16 and cpu_has_bf16()
    held_out = images(config.eval_images, "test")
    loader = torch.utils.data.DataLoader(_Batches(step, config.steps, config.batch, config.per_image,
                                                  model.config.vision_config.image_size),
                                         batch_size=None, num_workers=1, prefetch_factor=4)

    def save() -> None:
        save_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                               "elapsed": budget.elapsed, "history": history})

    last_ckpt = budget.elapsed
    bar = tqdm(total=config.steps, initial=step, desc="sam", mininterval=10)
    smooth = 0.0
    for step, kind, (pixels, prompts, target) in loader:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, step_progress(step, config.steps, config.warmup), lr=config.lr,
                            warmup=config.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = model.vision_encoder(pixels).last_hidden_state
            logits, iou = decode(model, emb, prompts)
        loss = mask_loss(logits, iou, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        smooth = 0.98 * smooth + 0.02 * value if step else value
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.3f}", kind=kind, refresh=False)
        step += 1
        if step % config.eval_every == 0:
            ev = evaluate(model, held_out, cost=False)
            history.append({"step": step, "minutes": budget.elapsed / 60, "loss": smooth,
                            **{k: v["miou"] for k, v in ev.items()}})
            print(json.dumps(history[-1]), flush=True)
            model.train()
        if budget.elapsed - last_ckpt > config.checkpoint_every:
            save()
            last_ckpt = budget.elapsed
        if budget.exhausted:
            break
    bar.close()
    save()
    model.eval()
    final = evaluate(model, images(config.final_images, "test"))
    history.append({"step": step, "final": True, "minutes": budget.elapsed / 60,
                    "images_seen": step * config.batch, **final})
    print(json.dumps(history[-1]), flush=True)
    model.save_pretrained(out / "model")
    make_processor(model).save_pretrained(out / "model")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return out / "model"


def main(argv=None) -> int:
    return cli(TrainSamConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
