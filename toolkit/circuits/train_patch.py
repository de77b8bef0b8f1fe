"""Train the shipped image patch model (``toolkit/assets/pc-patch``) from scikit-image's photos.

    python -m toolkit.circuits.train_patch --out toolkit/assets/pc-patch

Training photos and the held-out benchmark photos are disjoint lists below;
the validation figure comes from the bottom eighth of every training photo,
which training never sees. Runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from toolkit.circuits.images import image_to_records, train_patch_model

__all__ = ["TRAIN_PHOTOS", "HELD_OUT_PHOTOS", "load_photo", "main"]

#: skimage.data photos the patch model is trained on (natural images, grey and colour).
TRAIN_PHOTOS = ("camera", "astronaut", "rocket", "coins", "moon", "brick", "grass",
                "immunohistochemistry", "hubble_deep_field", "cell")
#: photos no shipped model sees: the image benchmark and the notebook use these.
HELD_OUT_PHOTOS = ("coffee", "chelsea", "clock", "gravel", "page", "text")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as ``uint8 [H, W]`` or ``[H, W, 3]`` (alpha dropped)."""
    import skimage.data

    im = np.asarray(getattr(skimage.data, name)())
    if im.dtype != np.uint8:
        raise ValueError(f"{name} is not an 8-bit image")
    return im[..., :3] if im.ndim == 3 else im


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--max-records", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    train, valid = [], []
    for name in TRAIN_PHOTOS:
        im = load_photo(name)
        cut = (im.shape[0] * 7 // 8) // args.patch * args.patch
        train.append(im[:cut])
        valid.append(im[cut:])
    model, hist = train_patch_model(train, patch=args.patch, num_latents=args.latents, epochs=args.epochs,
                                    max_records=args.max_records, valid=valid, seed=args.seed)
    wall = time.time() - t0
    # Validation bits per sub-pixel of the held-out strips, per channel count.
    vbpd = {}
    for ch, c in model.circuits.items():
        recs = [image_to_records(im if ch == 3 else (im if im.ndim == 2 else im[..., 1]), args.patch)
                for im in valid if ch == 1 or im.ndim == 3]
        x = np.concatenate(recs)
        with torch.no_grad():
            ll = float(c.log_likelihood(torch.from_numpy(x.astype(np.int64))).double().sum())
        vbpd[str(ch)] = -ll / x.size / np.log(2)
    model.meta = {"trained_on": list(TRAIN_PHOTOS), "held_out": list(HELD_OUT_PHOTOS),
                  "valid_bits_per_dim": vbpd, "wall_time_s": round(wall, 1),
                  "history": {str(k): v for k, v in hist.items()}}
    model.save(args.out)
    print(json.dumps({"sha256": model.sha256(), "valid_bits_per_dim": vbpd, "wall_time_s": wall,
                      "params": sum(c.num_parameters() for c in model.circuits.values())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
