"""Images as records for a circuit: a lossless transform, patches, and the patch model.

The image codec (``--codec pc``) codes an 8-bit grey or RGB image as
fixed-shape records for a *patch model* (one circuit per channel count):

1. colour images go through a reversible mod-256 colour transform
   (G, R-G+128, B-G+128), which removes most of the inter-channel redundancy;
2. each plane is replaced by its residual against the MED / LOCO-I
   predictor (median of left, up and left+up-upleft), mod 256: the residuals
   of natural images are peaked around 0, which is what the circuit models;
3. the residual planes are cut into ``p x p`` patches (the image padded with
   zero residuals up to a multiple of ``p``), one record of ``p*p*C`` values
   per patch, channel-interleaved so one circuit sees all colours of a patch.

Everything is integer arithmetic mod 256, so the inverse is exact. The
inverse of the predictor is sequential along rows, so it runs over
anti-diagonals: every pixel of a diagonal depends only on earlier ones.

This module knows no image file format: reading a PNG and rebuilding its exact
bytes is :mod:`toolkit.formats.png`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.em import EMConfig
from toolkit.circuits.train import circuit_sha256, fit_hclt
from toolkit.errors import ConfigError, FormatError
from toolkit.progress import Progress, reporter

__all__ = [
    "PatchModel",
    "image_to_records",
    "records_to_image",
    "forward_transform",
    "inverse_transform",
    "train_patch_model",
]

_PATCH_FORMAT = "toolkit.pc-patch"


# --------------------------------------------------------------------------- transform
def _med(left: np.ndarray, up: np.ndarray, upleft: np.ndarray) -> np.ndarray:
    lo, hi = np.minimum(left, up), np.maximum(left, up)
    return np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))


def forward_transform(pixels: np.ndarray) -> np.ndarray:
    """``uint8 [H, W]`` or ``[H, W, 3]`` pixels -> ``uint8 [C, H, W]`` residual planes."""
    x = pixels.astype(np.int64)
    if x.ndim == 2:
        planes = x[None]
    else:
        g = x[..., 1]
        planes = np.stack([g, (x[..., 0] - g + 128) & 255, (x[..., 2] - g + 128) & 255])
    c, h, w = planes.shape
    pad = np.zeros((c, h + 1, w + 1), dtype=np.int64)  # zero border: row 0 predicts left, col 0 up
    pad[:, 1:, 1:] = planes
    pred = _med(pad[:, 1:, :-1], pad[:, :-1, 1:], pad[:, :-1, :-1])
    return ((planes - pred) & 255).astype(np.uint8)


def inverse_transform(residuals: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`forward_transform`."""
    r = residuals.astype(np.int64)
    c, h, w = r.shape
    pad = np.zeros((c, h + 1, w + 1), dtype=np.int64)
    for t in range(h + w - 1):
        i = np.arange(max(0, t - w + 1), min(h, t + 1))
        j = t - i
        pred = _med(pad[:, i + 1, j], pad[:, i, j + 1], pad[:, i, j])
        pad[:, i + 1, j + 1] = (r[:, i, j] + pred) & 255
    planes = pad[:, 1:, 1:]
    if c == 1:
        return planes[0].astype(np.uint8)
    g = planes[0]
    rgb = np.stack([(planes[1] + g - 128) & 255, g, (planes[2] + g - 128) & 255], axis=-1)
    return rgb.astype(np.uint8)


def image_to_records(pixels: np.ndarray, patch: int) -> np.ndarray:
    """Pixels -> ``uint8 [num_patches, patch*patch*C]`` records of transformed values."""
    res = forward_transform(pixels)
    c, h, w = res.shape
    hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
    full = np.zeros((c, hp, wp), dtype=np.uint8)
    full[:, :h, :w] = res
    blocks = full.reshape(c, hp // patch, patch, wp // patch, patch).transpose(1, 3, 2, 4, 0)
    return np.ascontiguousarray(blocks.reshape(-1, patch * patch * c))


def records_to_image(records: np.ndarray, height: int, width: int, channels: int, patch: int) -> np.ndarray:
    """Inverse of :func:`image_to_records` for an image of the given size."""
    nh, nw = -(-height // patch), -(-width // patch)
    if records.shape != (nh * nw, patch * patch * channels):
        raise FormatError("patch records do not match the image size")
    full = records.reshape(nh, nw, patch, patch, channels).transpose(4, 0, 2, 1, 3)
    res = full.reshape(channels, nh * patch, nw * patch)[:, :height, :width]
    return inverse_transform(res)


# --------------------------------------------------------------------------- patch model
class PatchModel:
    """Circuits for ``patch x patch`` records of transformed images: one per channel count (1, 3)."""

    def __init__(self, circuits: dict[int, Circuit], patch: int, meta: dict | None = None):
        for ch, c in circuits.items():
            if c.num_vars != patch * patch * ch or c.num_cats != 256:
                raise ConfigError(f"{ch}-channel circuit does not fit {patch}x{patch} patches of bytes")
        self.circuits, self.patch, self.meta = circuits, patch, dict(meta or {})

    def sha256(self) -> str:
        h = hashlib.sha256(f"{_PATCH_FORMAT}:{self.patch}".encode())
        for ch in sorted(self.circuits):
            h.update(f"{ch}:{circuit_sha256(self.circuits[ch])}".encode())
        return h.hexdigest()

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for ch, c in self.circuits.items():
            c.save(path / f"c{ch}")
        cfg = {"format": _PATCH_FORMAT, "version": 1, "patch": self.patch,
               "channels": sorted(self.circuits), "transform": "rgb->G,R-G,B-G; MED residual mod 256",
               **self.meta}
        (path / "pcpatch.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> PatchModel:
        path = Path(directory)
        try:
            cfg = json.loads((path / "pcpatch.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path} is not a PC patch model: {exc}") from None
        if cfg.get("format") != _PATCH_FORMAT or cfg.get("version") != 1:
            raise FormatError(f"{path} is not a version-1 PC patch model")
        circuits = {int(ch): Circuit.load(path / f"c{ch}") for ch in cfg["channels"]}
        meta = {k: v for k, v in cfg.items() if k not in ("format", "version", "patch", "channels", "transform")}
        return cls(circuits, int(cfg["patch"]), meta)

    @staticmethod
    def is_patch_model(directory: str | Path) -> bool:
        return (Path(directory) / "pcpatch.json").is_file()


def train_patch_model(
    images: list[np.ndarray],
    config: EMConfig | None = None,
    *,
    patch: int = 4,
    num_latents: int = 32,
    max_records: int = 100_000,
    valid: list[np.ndarray] | None = None,
    progress: Progress = False,
) -> tuple[PatchModel, dict[int, list[dict]]]:
    """Train grey (from every image's green-based planes as grey) and colour patch circuits with EM under ``config``.

    Grey training records come from the grey images plus the luminance-like
    green channel of the colour images, so both circuits see every photo.
    At most ``max_records`` records (a random subset drawn with
    ``config.seed``) per circuit. ``progress`` counts the circuits trained.
    """
    config = config if config is not None else EMConfig()
    rng = np.random.default_rng(config.seed)

    def collect(imgs: list[np.ndarray], ch: int) -> np.ndarray | None:
        recs = []
        for im in imgs:
            if ch == 1:
                recs.append(image_to_records(im if im.ndim == 2 else im[..., 1], patch))
            elif im.ndim == 3:
                recs.append(image_to_records(im, patch))
        if not recs:
            return None
        x = np.concatenate(recs)
        if len(x) > max_records:
            x = x[rng.choice(len(x), max_records, replace=False)]
        return x

    report = reporter(progress, 2, "patch circuits")
    circuits, histories = {}, {}
    for done, ch in enumerate((1, 3), 1):
        x = collect(images, ch)
        if x is not None:
            v = collect(valid, ch) if valid else None
            torch.manual_seed(config.seed)
            circuits[ch], histories[ch] = fit_hclt(x, config, num_latents=num_latents, num_cats=256, valid=v,
                                                   mi_bins=32)
        report(done, 2)
    return PatchModel(circuits, patch), histories
