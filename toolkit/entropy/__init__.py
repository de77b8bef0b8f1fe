"""Entropy coding: integer frequency tables and range coding (a leaf: imports nothing above it).

Everything in the toolkit that turns probabilities into bits (the lm and pc
codecs, text-transform side streams, later weights, audio and KV bitstreams)
codes through this package, so encoder and decoder tables are made one way.
Names load on first use, so ``toolkit.entropy.varint`` (LEB128 counts) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CATEGORICAL",
    "DEFAULT_TOTAL_BITS",
    "MAX_TOTAL_BITS",
    "RangeCoder",
    "StreamDecoder",
    "counts_to_freqs",
    "decode_bytes",
    "decode_iid",
    "decode_iid_groups",
    "decode_symbols",
    "encode_bytes",
    "encode_iid",
    "encode_iid_groups",
    "encode_streams",
    "encode_symbols",
    "freqs_to_table",
    "ideal_bits",
    "logits_to_freqs",
    "probs_to_freqs",
    "probs_to_table",
]


#: what a torch-free caller (the integer lm engine) needs comes from the coder module alone
_CODER = {"CATEGORICAL", "DEFAULT_TOTAL_BITS", "MAX_TOTAL_BITS", "RangeCoder"}


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = "toolkit.entropy.coder" if name in _CODER else "toolkit.entropy.core"
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit.entropy' has no attribute {name!r}")
