"""Lossless coding of model weights: float planes, context-coded exponents, coded checkpoints.

:mod:`toolkit.weights.planes` splits floats into the bits worth coding and
the rest; :mod:`toolkit.weights.coding` codes runs of values (``fast``: zstd
byte planes; ``max``: ANS under row and column contexts);
:mod:`toolkit.weights.checkpoint` reads and validates safetensors headers;
:mod:`toolkit.weights.layout` finds the floats in safetensors, ``.npy`` and
tar files; :mod:`toolkit.weights.load` gives the tensors of a decoded
checkpoint; :mod:`toolkit.weights.memory` keeps a model's weights coded in
memory (DFloat11-style), decoded on the GPU by :mod:`toolkit.weights.device`
where the model runs there. The ``weights`` codec (:mod:`toolkit.codecs.weights`)
puts them behind ``codec compress model.safetensors`` and reads a coded
checkpoint into tensors (``load_state_dict``).
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["checkpoint", "coding", "device", "layout", "load", "memory", "planes"],
    submod_attrs={
        "checkpoint": ["SafetensorsHeader", "parse_header"],
        "coding": ["encode_segment", "decode_segment", "read_segment", "ContextSegment", "SegmentShape", "LEVELS",
            "plane_entropy"],
        "device": ["decode_on_device"],
        "layout": ["Scanner", "Span"],
        "load": ["read_checkpoint"],
        "memory": ["compress_weights_", "InMemoryConfig", "CodedModel", "CodedTensor"],
    },
)
