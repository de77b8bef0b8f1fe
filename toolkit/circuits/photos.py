"""The photos behind the shipped patch model: those it is trained on, and those no shipped model sees.

Training (:mod:`toolkit.recipes.train_patch`) uses :data:`TRAIN_PHOTOS`; the
image benchmark and the notebook measure on :data:`HELD_OUT_PHOTOS`. Both are
scikit-image sample photos, so they are the same on every machine.
"""

from __future__ import annotations

import numpy as np

from toolkit.errors import UnsupportedInputError

__all__ = ["TRAIN_PHOTOS", "HELD_OUT_PHOTOS", "load_photo"]

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
        raise UnsupportedInputError(f"{name} is not an 8-bit image")
    return im[..., :3] if im.ndim == 3 else im
