"""Images with known instance masks, for training and evaluating promptable segmentation (SAM).

A Segment Anything model needs images whose objects' masks are known
exactly. Each image here is a natural background (a random crop, flip and
scale of one of scikit-image's sample photographs, or a drawn texture) with
1-5 objects pasted on it, back to front:

* shapes: ellipses, rotated rectangles, star and convex polygons, smooth
  random blobs, and the silhouette of scikit-image's ``horse``;
* fills: flat colour with shading, a colour gradient, a drawn texture
  (stripes, checks, noise), or a cut-out of another photograph, so the
  object's inside looks like a natural image and only its outline marks it;
* several scales (from about 6% to 70% of the image side), and occlusion:
  a later object covers earlier ones, and each mask is what stays visible.

An object is kept only while at least 40 pixels and a fifth of its own area
stay visible. The photographs are split in two: backgrounds and cut-outs of
``split="train"`` come from one set and ``split="test"`` from the other, and
the seed streams are disjoint, so held-out images show scenes, textures and
photographs no model trained here has seen. Every image is a pure function of
``(seed, split, size)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["SegImage", "make_image", "images", "PHOTOS", "box_of", "sample_points"]

# Photographs bundled in the scikit-image wheel (no download). Held-out ones are
# natural photographs too, so evaluation is not on an easier kind of background.
PHOTOS = {
    "train": ("astronaut", "camera", "brick", "grass", "gravel", "moon", "page", "text", "coins",
              "hubble_deep_field", "immunohistochemistry", "logo", "clock"),
    "test": ("chelsea", "coffee", "rocket", "retina", "cell", "microaneurysms"),
}
_SPLITS = {"train": 0, "test": 1}
_MIN_PIXELS = 40
_MIN_VISIBLE = 0.2


@dataclass
class SegImage:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) bool, visible part of each object, back to front
    kinds: tuple[str, ...]  # shape kind of each mask


def _check_split(split: str) -> int:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, not {split!r}")
    return _SPLITS[split]


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-9))).astype(np.uint8)
    return np.ascontiguousarray(img)


@cache
def _horse() -> np.ndarray:
    import skimage.data

    h = ~np.asarray(skimage.data.horse()).astype(bool)  # the horse is drawn dark on white
    ys, xs = np.nonzero(h)
    return h[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _resize(img: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    mode = Image.NEAREST if nearest else Image.BILINEAR
    if img.dtype == bool:
        return np.asarray(Image.fromarray(img.astype(np.uint8) * 255).resize((w, h), mode)) > 127
    return np.asarray(Image.fromarray(img).resize((w, h), mode))


def _photo_crop(rng: np.random.Generator, split: str, h: int, w: int) -> np.ndarray:
    img = _photo(PHOTOS[split][rng.integers(len(PHOTOS[split]))])
    ih, iw = img.shape[:2]
    side = int(rng.uniform(0.25, 1.0) * min(ih, iw))
    ch, cw = side, min(iw, int(side * w / h))
    y0, x0 = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
    crop = img[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _resize(np.ascontiguousarray(crop), h, w)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle
        a, period = rng.uniform(0, np.pi), rng.uniform(3, 14)
        t = (np.sin((xx * np.cos(a) + yy * np.sin(a)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 1:  # checks
        s = rng.uniform(3, 12)
        t = ((np.floor(xx / s) + np.floor(yy / s)) % 2).astype(np.float32)
    else:  # smooth noise
        g = rng.random((h // 8 + 2, w // 8 + 2)).astype(np.float32)
        t = _resize((g * 255).astype(np.uint8), h, w).astype(np.float32) / 255
    out = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return np.clip(out + rng.normal(0, 6, out.shape), 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    size = np.exp(rng.uniform(np.log(0.06), np.log(0.7))) * min(h, w)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
    kind = ("ellipse", "rectangle", "star", "polygon", "blob", "horse")[rng.integers(6)]
    r = size / 2
    if kind == "ellipse":
        e = rng.uniform(0.4, 1.0)
        m = (u / r) ** 2 + (v / (r * e)) ** 2 <= 1
    elif kind == "rectangle":
        e = rng.uniform(0.3, 1.0)
        m = (np.abs(u) <= r) & (np.abs(v) <= r * e)
    elif kind in ("star", "polygon"):
        n = rng.integers(5, 9) if kind == "star" else rng.integers(3, 8)
        ang = np.arctan2(v, u)
        rad = np.hypot(u, v)
        if kind == "star":
            inner = rng.uniform(0.35, 0.6)
            frac = (ang % (2 * np.pi / n)) / (2 * np.pi / n)
            lim = r * (inner + (1 - inner) * np.abs(1 - 2 * frac))
        else:  # regular n-gon: distance to the edge at this angle
            sector = 2 * np.pi / n
            lim = r * np.cos(np.pi / n) / np.cos((ang % sector) - sector / 2)
        m = rad <= lim
    elif kind == "blob":
        g = rng.random((5, 5)).astype(np.float32)
        field = _resize((g * 255).astype(np.uint8), int(2 * r) + 2, int(2 * r) + 2).astype(np.float32) / 255
        yy0, xx0 = np.mgrid[0:field.shape[0], 0:field.shape[1]]
        c = (field.shape[0] - 1) / 2
        fall = 1 - np.hypot(yy0 - c, xx0 - c) / max(c, 1)
        local = (0.6 * field + fall) > 0.85
        m = np.zeros((h, w), bool)
        y0, x0 = int(cy - c), int(cx - c)
        ys, xs = slice(max(y0, 0), min(y0 + local.shape[0], h)), slice(max(x0, 0), min(x0 + local.shape[1], w))
        m[ys, xs] = local[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    else:
        horse = _horse()
        hh = max(int(size), 4)
        hw = max(int(size * horse.shape[1] / horse.shape[0]), 4)
        local = _resize(horse, hh, hw, nearest=True)
        if rng.random() < 0.5:
            local = local[:, ::-1]
        m = np.zeros((h, w), bool)
        y0, x0 = int(cy - hh / 2), int(cx - hw / 2)
        ys, xs = slice(max(y0, 0), min(y0 + hh, h)), slice(max(x0, 0), min(x0 + hw, w))
        if ys.stop > ys.start and xs.stop > xs.start:
            m[ys, xs] = local[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return m, kind


def _fill(rng: np.random.Generator, split: str, h: int, w: int) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # flat colour with a little shading
        c = rng.uniform(0, 255, 3)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        shade = 1 + 0.25 * ((xx / w - 0.5) * rng.normal() + (yy / h - 0.5) * rng.normal())
        return np.clip(c * shade[..., None] + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    if kind == 1:  # gradient between two colours
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = ((xx * np.cos(a) + yy * np.sin(a)) / max(h, w) + 1) / 2
        return np.clip(c1 * (1 - t[..., None]) + c2 * t[..., None], 0, 255).astype(np.uint8)
    if kind == 2:
        return _texture(rng, h, w)
    return _photo_crop(rng, split, h, w)  # a cut-out of a photograph


def make_image(seed: int, split: str = "train", size: int = 128, max_objects: int = 5) -> SegImage:
    """One image with its objects' visible masks; a pure function of ``(seed, split, size)``."""
    rng = np.random.default_rng([int(seed), _check_split(split), int(size), 7])
    h = w = int(size)
    img = (_photo_crop(rng, split, h, w) if rng.random() < 0.75 else _texture(rng, h, w)).astype(np.float32)
    if rng.random() < 0.5:  # vary contrast so objects do not always stand out
        img = img * rng.uniform(0.6, 1.1) + rng.uniform(-20, 20)
    masks: list[np.ndarray] = []
    kinds: list[str] = []
    full: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        m, kind = _shape_mask(rng, h, w)
        if m.sum() < _MIN_PIXELS:
            continue
        fill = _fill(rng, split, h, w).astype(np.float32)
        # A soft one-pixel edge, as a pasted photo object has; the mask stays the hard shape.
        alpha = m.astype(np.float32)
        edge = (alpha + np.roll(alpha, 1, 0) + np.roll(alpha, -1, 0) + np.roll(alpha, 1, 1) + np.roll(alpha, -1, 1)) / 5
        alpha = np.where(m, np.maximum(edge, 0.5), edge * 0.5)[..., None]
        img = img * (1 - alpha) + fill * alpha
        masks = [old & ~m for old in masks]
        masks.append(m)
        kinds.append(kind)
        full.append(int(m.sum()))
    keep = [i for i, m in enumerate(masks) if m.sum() >= max(_MIN_PIXELS, _MIN_VISIBLE * full[i])]
    image = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    stack = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, h, w), bool)
    return SegImage(image, stack, tuple(kinds[i] for i in keep))


def images(n: int, split: str = "train", start: int = 0, size: int = 128) -> list[SegImage]:
    """Images with seeds ``start .. start + n - 1``, keeping those with at least one object."""
    out = [make_image(s, split, size) for s in range(start, start + n)]
    return [im for im in out if len(im.masks)]


def box_of(mask: np.ndarray) -> np.ndarray:
    """The tight box of a mask, ``(x0, y0, x1, y1)``: the first and last pixel columns and rows it covers."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("the mask is empty: it has no box")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def sample_points(mask: np.ndarray, k: int, rng: np.random.Generator, interior: bool = True) -> np.ndarray:
    """``k`` pixels ``(x, y)`` inside ``mask`` (SAM's convention: pixel indices); ``interior`` keeps off the edge."""
    m = mask
    if interior:
        from scipy.ndimage import distance_transform_edt

        dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        if dist.max() >= 3:
            m = dist >= min(3.0, dist.max() / 2)
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        raise ValueError("the mask is empty: no point lies inside it")
    idx = rng.choice(len(ys), size=k, replace=len(ys) < k)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)
