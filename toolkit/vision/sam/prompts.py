"""Prompts for objects whose masks are known: boxes and points, as SAM is trained and evaluated.

Training jitters boxes (SAM: noise of 10% of the box side, at most 20 pixels
at 1024, so about 3 pixels here) and draws points anywhere inside the object;
evaluation uses tight boxes and points drawn away from the edge, from a fixed
seed, so every model sees the same prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from toolkit.data.segments import SegImage, box_of, sample_points
from toolkit.vision.sam.model import Prompts, to_pixels

__all__ = ["KINDS", "make_batch"]

KINDS = ("box", "point", "points")  # a box; one point; several points (three at evaluation)


def make_batch(items: list[SegImage], kind: str, per_image: int, rng: np.random.Generator,
               train: bool = False, n_points: int = 3) -> tuple[torch.Tensor, Prompts, torch.Tensor]:
    """Pixels (B, 3, S, S), prompts for ``per_image`` objects of each image, and their masks (B, P, S, S).

    An image with fewer objects repeats some. With ``train``, boxes are jittered,
    points may fall near the edge, and a point prompt sometimes carries one
    negative point (outside the object).
    """
    if kind not in KINDS:
        raise ValueError(f"prompt kind must be one of {KINDS}, not {kind!r}")
    if not items:
        raise ValueError("no images")
    size = items[0].image.shape[0]
    n_pos = 1 if kind == "point" else (int(rng.integers(2, 5)) if train else n_points)
    negative = train and kind == "points" and rng.random() < 0.3
    boxes, points, labels, targets = [], [], [], []
    for item in items:
        if len(item.masks) == 0:
            raise ValueError("an image has no objects to prompt")
        chosen = rng.permutation(len(item.masks))
        if len(chosen) < per_image:
            chosen = np.concatenate([chosen, rng.choice(len(item.masks), per_image - len(chosen))])
        chosen = chosen[:per_image]
        targets.append(item.masks[chosen])
        if kind == "box":
            b = np.stack([box_of(item.masks[i]) for i in chosen])
            if train:
                side = np.repeat(np.maximum(b[:, 2:] - b[:, :2], 1.0), 2, axis=1)
                b = b + rng.normal(0, 1, b.shape) * np.minimum(0.1 * side, 3.0)
                b = np.clip(b, 0, size - 1)
                b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
            boxes.append(b)
        else:
            pts, labs = [], []
            for i in chosen:
                p = sample_points(item.masks[i], n_pos, rng, interior=not train)
                lab = np.ones(n_pos, np.int64)
                if negative:
                    outside = ~item.masks[i]
                    p = np.concatenate([p, sample_points(outside, 1, rng, interior=False)])
                    lab = np.concatenate([lab, [0]])
                pts.append(p)
                labs.append(lab)
            points.append(np.stack(pts))
            labels.append(np.stack(labs))
    pixels = to_pixels([item.image for item in items])
    target = torch.from_numpy(np.stack(targets))
    if kind == "box":
        return pixels, Prompts(boxes=torch.from_numpy(np.stack(boxes).astype(np.float32))), target
    return pixels, Prompts(points=torch.from_numpy(np.stack(points)), labels=torch.from_numpy(np.stack(labels))), target
