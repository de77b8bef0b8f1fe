"""Lossless coding of model weights: float planes, context-coded exponents, coded checkpoints.

:mod:`toolkit.weights.planes` splits floats into the bits worth coding and
the rest; :mod:`toolkit.weights.coding` codes runs of values (``fast``: zstd
byte planes; ``max``: ANS under row and column contexts);
:mod:`toolkit.weights.checkpoint` reads and validates safetensors headers;
:mod:`toolkit.weights.layout` finds the floats in safetensors, ``.npy`` and
tar files; :mod:`toolkit.weights.load` loads coded checkpoints into models
and keeps a model's weights coded in memory (DFloat11-style).
The ``weights`` codec (:mod:`toolkit.codecs.weights`) puts them behind
``codec compress model.safetensors``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["encode_segment", "decode_segment", "SegmentShape", "LEVELS", "plane_entropy",
           "SafetensorsHeader", "parse_header", "load_state_dict", "compress_in_memory", "CodedModel"]

_WHERE = {"encode_segment": "coding", "decode_segment": "coding", "SegmentShape": "coding", "LEVELS": "coding",
          "plane_entropy": "coding", "SafetensorsHeader": "checkpoint", "parse_header": "checkpoint",
          "load_state_dict": "load", "compress_in_memory": "load", "CodedModel": "load"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"toolkit.weights.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'toolkit.weights' has no attribute {name!r}")
