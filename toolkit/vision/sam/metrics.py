"""How well a (compressed) SAM segments, and what its image encoder costs.

mIoU is the mean over prompted objects of the IoU between the predicted and
the true mask (and, given a teacher, between the prediction and the
teacher's own prediction for the same prompt). Prompts are the same for every
model: a seeded stream per image. The encoder's cost is its parameter count,
its multiply-accumulates for one image (counted by ``torch.utils.flop_counter``,
so attention and the neck are included), and its CPU latency.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from toolkit.data.segments import SegImage
from toolkit.vision.sam.model import image_size_of, predict
from toolkit.vision.sam.prompts import KINDS, make_batch

__all__ = ["evaluate", "encoder_cost", "miou"]


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def _fit(items: list[SegImage], size: int) -> list[SegImage]:
    """Images of another size or channel count, resized (masks by nearest pixel) and made RGB."""
    from PIL import Image

    out = []
    for it in items:
        img = np.asarray(it.image)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise ValueError(f"an image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        img = img[..., :3]
        masks = np.asarray(it.masks, bool)
        if masks.ndim != 3 or masks.shape[1:] != img.shape[:2]:
            raise ValueError(f"masks must be (N, H, W) matching the image {img.shape[:2]}, got {masks.shape}")
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.BILINEAR))
            masks = np.stack([np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in masks]) \
                if len(masks) else np.zeros((0, size, size), bool)
        keep = masks.reshape(len(masks), -1).any(1)
        kinds = tuple(it.kinds) if len(it.kinds) == len(masks) else ("",) * len(masks)
        out.append(SegImage(img.astype(np.uint8), masks[keep], tuple(k for k, m in zip(kinds, keep, strict=True) if m)))
    return [it for it in out if len(it.masks)]


@torch.no_grad()
def miou(model, images: list[SegImage], kind: str, per_image: int = 4, seed: int = 0, batch: int = 16,
         teacher=None) -> dict:
    """mIoU of one prompt kind against the true masks (and the teacher's masks, given one)."""
    items = _fit(images, image_size_of(model))
    if not items:
        raise ValueError("no images with objects to evaluate on")
    gt_ious, t_ious = [], []
    for i in range(0, len(items), batch):
        rng = np.random.default_rng([seed, i, KINDS.index(kind)])
        pixels, prompts, target = make_batch(items[i:i + batch], kind, per_image, rng)
        pred = predict(model, pixels, prompts)
        gt_ious.append(_iou(pred, target).flatten())
        if teacher is not None:
            t_ious.append(_iou(pred, predict(teacher, pixels, prompts)).flatten())
    out = {"miou": float(torch.cat(gt_ious).mean()), "n": int(sum(len(x) for x in gt_ious))}
    if teacher is not None:
        out["miou_vs_teacher"] = float(torch.cat(t_ious).mean())
    return out


def encoder_cost(model, repeats: int = 20) -> dict:
    """The image encoder's parameters, MACs for one image, and median CPU latency (ms, batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    enc = model.vision_encoder
    size = image_size_of(model)
    x = torch.randn(1, 3, size, size, dtype=next(enc.parameters()).dtype)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            enc(x)
        flops = counter.get_total_flops()
        for _ in range(3):
            enc(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            enc(x)
            times.append(time.perf_counter() - t)
    return {"params": int(sum(p.numel() for p in enc.parameters())), "macs": int(flops // 2),
            "latency_ms": float(np.median(times) * 1000)}


def evaluate(model, images: list[SegImage], teacher=None, kinds: tuple[str, ...] = KINDS, per_image: int = 4,
             seed: int = 0, cost: bool = True) -> dict:
    """mIoU per prompt kind (boxes, one point, three points), against truth and teacher, plus the encoder's cost.

    ``images`` are images with known masks (:class:`toolkit.data.segments.SegImage`);
    images of another size or channel count are resized and converted to RGB first.
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"prompt kind must be one of {KINDS}, not {k!r}")
    was = model.training
    model.eval()
    try:
        res: dict = {k: miou(model, images, k, per_image, seed, teacher=teacher) for k in kinds}
        if cost:
            res["encoder"] = encoder_cost(model)
    finally:
        model.train(was)
    return res
