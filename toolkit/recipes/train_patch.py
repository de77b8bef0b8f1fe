"""Train the shipped image patch model (``toolkit/assets/pc-patch``) from scikit-image's photos.

    python -m toolkit.recipes.train_patch --out toolkit/assets/pc-patch --patch 8 --latents 32 --epochs 20

Training photos and the held-out benchmark photos are disjoint lists
(:mod:`toolkit.circuits.photos`); the validation figure comes from the
bottom eighth of every training photo, which training never sees. Runs on
one CPU thread, so the model is the same on every run of one machine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from toolkit.circuits import EMConfig, image_to_records, train_patch_model
from toolkit.circuits.photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, load_photo
from toolkit.config import Config, check
from toolkit.recipes.common import cli, set_threads

__all__ = ["TrainPatchConfig", "run", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPatchConfig(Config):
    """Train the pc codec's patch model: a grey and a colour circuit over p x p patches."""

    out: Path = field(metadata={"help": "directory the patch model is saved to"})
    patch: int = field(default=4, metadata={"help": "patch side in pixels"})
    latents: int = field(default=32, metadata={"help": "latent states per variable of each circuit"})
    epochs: int = field(default=15, metadata={"help": "EM epochs per circuit"})
    max_records: int = field(default=200_000, metadata={"help": "most training patches per circuit (a seeded subset)"})
    seed: int = field(default=0, metadata={"help": "seed of the patch subset, the initial parameters and EM"})

    def __post_init__(self) -> None:
        check(self.patch >= 1, f"patch must be at least 1, got {self.patch}")
        check(self.latents >= 1, f"latents must be at least 1, got {self.latents}")
        check(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        check(self.max_records >= 1, f"max_records must be at least 1, got {self.max_records}")


def run(config: TrainPatchConfig) -> Path:
    """Train, measure the held-out strips, save the model with its provenance; returns its directory."""
    set_threads(1)
    t0 = time.time()
    train, valid = [], []
    for name in TRAIN_PHOTOS:
        im = load_photo(name)
        cut = (im.shape[0] * 7 // 8) // config.patch * config.patch
        train.append(im[:cut])
        valid.append(im[cut:])
    model, hist = train_patch_model(train, EMConfig(epochs=config.epochs, seed=config.seed), patch=config.patch,
                                    num_latents=config.latents, max_records=config.max_records, valid=valid)
    wall = time.time() - t0
    # Validation bits per sub-pixel of the held-out strips, per channel count.
    vbpd = {}
    for ch, c in model.circuits.items():
        recs = [image_to_records(im if ch == 3 else (im if im.ndim == 2 else im[..., 1]), config.patch)
                for im in valid if ch == 1 or im.ndim == 3]
        x = np.concatenate(recs)
        with torch.no_grad():
            ll = float(c.log_likelihood(torch.from_numpy(x.astype(np.int64))).double().sum())
        vbpd[str(ch)] = -ll / x.size / np.log(2)
    model.meta = {"trained_on": list(TRAIN_PHOTOS), "held_out": list(HELD_OUT_PHOTOS),
                  "valid_bits_per_dim": vbpd, "wall_time_s": round(wall, 1),
                  "history": {str(k): v for k, v in hist.items()}}
    model.save(config.out)
    logger.info("%s", json.dumps({"sha256": model.sha256(), "valid_bits_per_dim": vbpd, "wall_time_s": wall,
                                  "params": sum(c.num_parameters() for c in model.circuits.values())}))
    return config.out


def main(argv: list[str] | None = None) -> int:
    return cli(TrainPatchConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
