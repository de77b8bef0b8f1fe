"""The small Segment Anything model trained here, and running any ``SamModel`` on prompts.

The model is Hugging Face's ``SamModel`` (the class of the ``facebook/sam-vit-*``
checkpoints) at a small size: a ViT image encoder with windowed and global
attention, relative position tables and SAM's convolutional neck, SAM's prompt
encoder and its two-way mask decoder. Only the sizes differ from the public
checkpoints: 128 x 128 inputs in 8 x 8 patches (a 16 x 16 embedding grid, as
SAM's 1024 / 16 = 64 is at full size), a 192-wide encoder and 128-channel
embeddings.

Prompts follow SAM: a box alone or points alone decode with the single-mask
token; one point is ambiguous, so it decodes three masks and the one with the
highest predicted IoU is taken (``multimask`` below).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SHIPPED", "sam_config", "build_sam", "load_sam", "as_stored", "make_processor", "to_pixels", "Prompts",
           "segment", "predict", "image_size_of", "check_images"]

SHIPPED = "sam-shapes"
# ImageNet statistics, SAM's (and SamImageProcessor's) normalisation.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def sam_config(image_size: int = 128, patch_size: int = 8, hidden: int = 192, layers: int = 6, heads: int = 6,
               mlp: int = 768, window: int = 8, global_attn: tuple[int, ...] = (2, 5), channels: int = 128,
               decoder_mlp: int = 512, decoder_heads: int = 4):
    """A ``SamConfig`` at the given sizes (defaults: the shipped ``sam-shapes``)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(hidden_size=hidden, output_channels=channels, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                             window_size=window, global_attn_indexes=list(global_attn), mlp_dim=mlp,
                             num_pos_feats=channels // 2, initializer_range=0.02)
    prompt = SamPromptEncoderConfig(hidden_size=channels, image_size=image_size, patch_size=patch_size)
    decoder = SamMaskDecoderConfig(hidden_size=channels, mlp_dim=decoder_mlp, num_attention_heads=decoder_heads,
                                   iou_head_hidden_dim=channels)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                     mask_decoder_config=decoder.to_dict())


def build_sam(config=None, seed: int = 0):
    """A freshly initialised ``SamModel`` (``config`` defaults to :func:`sam_config`)."""
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel(config if config is not None else sam_config())
    # SAM's random Fourier features for prompt and image positions are a fixed Gaussian
    # matrix of unit scale. transformers initialises them with a standard deviation of
    # half the encoder width (harmless when a checkpoint overwrites them); at that scale
    # every position maps to noise and no prompt can be localised, so draw them as SAM
    # does and keep them fixed.
    pe = model.shared_image_embedding.positional_embedding
    with torch.no_grad():
        pe.copy_(torch.randn(pe.shape, generator=torch.Generator().manual_seed(seed)))
    pe.requires_grad_(False)
    # transformers draws every weight from N(0, 0.02). SAM was trained from PyTorch's
    # default initialisation, which for the decoder's narrow layers is 2-3x larger; at
    # 0.02 the mask logits are a product of small factors and barely depend on the
    # prompt, and training sits at "all background" for hundreds of steps. On a batch
    # it should overfit, the default initialisation reaches IoU 0.45 in 60 steps where
    # 0.02 reaches 0.17.
    for module in [*model.mask_decoder.modules(), *model.prompt_encoder.modules()]:
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model.eval()


def load_sam(name: str = SHIPPED, dtype: torch.dtype = torch.float32):
    """The shipped model by name, or a saved ``SamModel`` directory, in eval mode."""
    from toolkit.models import store

    def loader(where):
        from transformers import SamModel

        return SamModel.from_pretrained(str(where.path), dtype=dtype).eval()

    return store.load(f"sam:{dtype}", loader, str(name) if isinstance(name, Path) else name)


def as_stored(model, dtype: torch.dtype):
    """A copy of ``model`` as it loads after being stored in ``dtype``: the values ``from_pretrained`` gives.

    Evaluating this copy gives the figures of the stored model without writing it.
    """
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
        for b in out.buffers():
            if b.is_floating_point():
                b.copy_(b.to(dtype).float())
    return out.eval()


def image_size_of(model) -> int:
    return int(model.config.vision_config.image_size)


def check_images(model, images, what: str) -> int:
    """The model's input size, after checking that ``images`` is a non-empty list at that size, in RGB."""
    if not images:
        raise ValueError(f"{what} needs at least one image")
    size = image_size_of(model)
    for it in images:
        if it.image.shape != (size, size, 3):
            raise ValueError(f"images must be {size} x {size} RGB, got {it.image.shape}")
    return size


def make_processor(model_or_size):
    """A ``SamProcessor`` that resizes and pads images (and rescales prompts) to the model's input size."""
    from transformers import SamImageProcessor, SamProcessor

    size = model_or_size if isinstance(model_or_size, int) else image_size_of(model_or_size)
    low = size // 2
    ip = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                           mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})
    return SamProcessor(ip)


def to_pixels(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """(B, H, W, 3) uint8 images already at the model's size -> normalised (B, 3, H, W) float32."""
    arr = np.stack(images) if isinstance(images, list) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got shape {arr.shape}")
    x = (arr.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@dataclass
class Prompts:
    """One kind of prompt for P objects in each of B images, in model-input pixels.

    ``boxes`` (B, P, 4) ``x0, y0, x1, y1``; or ``points`` (B, P, N, 2) ``x, y`` with
    ``labels`` (B, P, N): 1 inside the object, 0 outside it.
    """

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __post_init__(self):
        if (self.boxes is None) == (self.points is None):
            raise ValueError("give either boxes or points")
        if self.boxes is not None:
            if self.boxes.ndim != 3 or self.boxes.shape[-1] != 4 or self.boxes.shape[1] == 0:
                raise ValueError(f"boxes must be (B, P, 4) with P >= 1, got {tuple(self.boxes.shape)}")
        else:
            if self.points.ndim != 4 or self.points.shape[-1] != 2 or 0 in self.points.shape[1:3]:
                raise ValueError(f"points must be (B, P, N, 2) with P, N >= 1, got {tuple(self.points.shape)}")
            if self.labels is None:
                self.labels = torch.ones(self.points.shape[:3], dtype=torch.long)
            if self.labels.shape != self.points.shape[:3]:
                raise ValueError(f"labels must be {tuple(self.points.shape[:3])}, got {tuple(self.labels.shape)}")

    @property
    def multimask(self) -> bool:
        """One point alone is ambiguous: decode three masks and keep the most confident."""
        return self.points is not None and self.points.shape[2] == 1

    def check_inside(self, size: int) -> None:
        coords = self.boxes if self.boxes is not None else self.points
        if not torch.isfinite(coords).all():
            raise ValueError("prompt coordinates must be finite")
        if (coords < 0).any() or (coords > size - 1).any():
            raise ValueError(f"a prompt lies outside the {size} x {size} image (coordinates 0 .. {size - 1})")
        if self.boxes is not None and ((self.boxes[..., 2] < self.boxes[..., 0])
                                       | (self.boxes[..., 3] < self.boxes[..., 1])).any():
            raise ValueError("a box has x1 < x0 or y1 < y0")


def decode(model, embeddings: torch.Tensor, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits (B, P, K, h, w) at the decoder's resolution and IoU estimates (B, P, K)."""
    out = model(image_embeddings=embeddings, input_boxes=prompts.boxes,
                input_points=prompts.points, input_labels=prompts.labels, multimask_output=prompts.multimask)
    return out.pred_masks, out.iou_scores


def select(masks: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """Of K candidate masks per prompt, the one with the highest predicted IoU: (B, P, h, w)."""
    if masks.shape[2] == 1:
        return masks[:, :, 0]
    best = iou.argmax(dim=2)
    return torch.gather(masks, 2, best[:, :, None, None, None].expand(-1, -1, 1, *masks.shape[-2:]))[:, :, 0]


def _as_rgb(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape[:2]:
        raise ValueError(f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) and not empty, "
                         f"got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError("the image has NaN or infinite pixels")
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


@torch.no_grad()
def segment(model, image, boxes=None, points=None, labels=None, processor=None) -> np.ndarray:
    """Masks (P, H, W) for one image of any size, prompts in its own pixels, as ``SamProcessor`` handles them.

    ``boxes``: P boxes ``[x0, y0, x1, y1]``; or ``points``: P lists of ``[x, y]``
    (with ``labels``, 1 inside the object and 0 outside). Grey and RGBA images are
    converted to RGB; the image is resized and padded to the model's input.
    """
    img = _as_rgb(image)
    h, w = img.shape[:2]
    if (boxes is None) == (points is None):
        raise ValueError("give either boxes or points")
    prompt = np.asarray(boxes if boxes is not None else points, dtype=np.float64)
    if prompt.size == 0:
        raise ValueError("the prompt list is empty")
    if boxes is not None and (prompt.ndim != 2 or prompt.shape[1] != 4):
        raise ValueError(f"boxes must be a list of [x0, y0, x1, y1], got shape {prompt.shape}")
    if points is not None and (prompt.ndim != 3 or prompt.shape[2] != 2):
        raise ValueError(f"points must be P lists of [x, y] (shape (P, N, 2)), got shape {prompt.shape}")
    xs, ys = prompt[..., 0::2], prompt[..., 1::2]
    if not np.isfinite(prompt).all() or (xs < 0).any() or (ys < 0).any() or (xs > w - 1).any() \
            or (ys > h - 1).any():
        raise ValueError(f"a prompt lies outside the {w} x {h} image")
    processor = processor or make_processor(model)
    if boxes is not None:
        inputs = processor(images=img, input_boxes=[prompt.tolist()], return_tensors="pt")
        prompts = Prompts(boxes=inputs["input_boxes"].float())
    else:
        inputs = processor(images=img, input_points=[prompt.tolist()], return_tensors="pt")
        lab = torch.ones(inputs["input_points"].shape[:3], dtype=torch.long) if labels is None \
            else torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(inputs["input_points"].shape[:3])
        prompts = Prompts(points=inputs["input_points"].float(), labels=lab)
    dtype = next(model.parameters()).dtype
    emb = model.get_image_embeddings(inputs["pixel_values"].to(dtype))
    logits, iou = decode(model, emb, prompts)
    best = select(logits, iou)[:, :, None].float()  # (1, P, 1, h, w)
    masks = processor.post_process_masks(best, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    return masks[:, 0].numpy()


@torch.no_grad()
def predict(model, pixel_values: torch.Tensor, prompts: Prompts, embeddings: torch.Tensor | None = None):
    """Boolean masks (B, P, H, W) at the input's resolution, for one kind of prompt per call."""
    size = image_size_of(model)
    prompts.check_inside(size)
    if embeddings is None:
        embeddings = model.get_image_embeddings(pixel_values)
    masks, iou = decode(model, embeddings, prompts)
    best = select(masks, iou)
    return F.interpolate(best, size=(size, size), mode="bilinear", align_corners=False) > 0
