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

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["checkpoint", "coding", "layout", "load", "planes"],
    submod_attrs={
        "coding": ["encode_segment", "decode_segment", "SegmentShape", "LEVELS", "plane_entropy"],
        "checkpoint": ["SafetensorsHeader", "parse_header"],
        "load": ["load_state_dict", "compress_in_memory", "CodedModel"],
    },
)
