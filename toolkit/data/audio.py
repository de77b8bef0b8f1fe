"""The audio codec's training material on disk: splits of 16 kHz mono clips, end to end.

A split ``NAME`` is ``NAME.npy`` (int16, every clip end to end) and
``NAME.json`` (the sample rate, and each clip's source, offset and length).
``python -m toolkit.recipes.build_audio_data`` builds ``train`` and ``valid``
from Debian packages (toolkit/data/SOURCES.md); training
(``python -m toolkit.recipes.train_audio``) reads them memory-mapped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["SAMPLE_RATE", "load_split", "write_split"]

SAMPLE_RATE = 16000


def write_split(out: str | os.PathLike, name: str, clips: list[tuple[str, np.ndarray]]) -> None:
    """Write ``(source, float32 samples at 16 kHz)`` clips as a split that training reads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pcm = [np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16) for _, x in clips]
    index, offset = [], 0
    for (src, _), p in zip(clips, pcm, strict=True):
        index.append({"source": src, "offset": offset, "length": int(p.size)})
        offset += p.size
    np.save(out / f"{name}.npy", np.concatenate(pcm) if pcm else np.zeros(0, np.int16))
    (out / f"{name}.json").write_text(json.dumps({"sample_rate": SAMPLE_RATE, "clips": index}, indent=0))


def load_split(root: str | os.PathLike, name: str = "train") -> tuple[np.ndarray, list[dict]]:
    """(int16 samples, clip index) of a split written by :func:`write_split` (memory-mapped)."""
    root = Path(root)
    data = np.load(root / f"{name}.npy", mmap_mode="r")
    index = json.loads((root / f"{name}.json").read_text())["clips"]
    return data, index
