"""Entropy coding: integer frequency tables and range coding (a leaf: imports nothing above it).

Everything in the toolkit that turns probabilities into bits (the lm and pc
codecs, text-transform side streams, later weights, audio and KV bitstreams)
codes through this package, so encoder and decoder tables are made one way.
"""

from toolkit.entropy.core import (
    CATEGORICAL,
    DEFAULT_TOTAL_BITS,
    MAX_TOTAL_BITS,
    RangeCoder,
    StreamDecoder,
    decode_symbols,
    encode_streams,
    encode_symbols,
    freqs_to_table,
    ideal_bits,
    logits_to_freqs,
    probs_to_freqs,
    probs_to_table,
)
from toolkit.entropy.varint import read_varint, varint

__all__ = [
    "CATEGORICAL",
    "DEFAULT_TOTAL_BITS",
    "MAX_TOTAL_BITS",
    "RangeCoder",
    "StreamDecoder",
    "decode_symbols",
    "encode_streams",
    "encode_symbols",
    "freqs_to_table",
    "ideal_bits",
    "logits_to_freqs",
    "probs_to_freqs",
    "probs_to_table",
    "read_varint",
    "varint",
]
