"""Entropy coding: integer frequency tables and range coding (a leaf: imports nothing above it).

Everything in the toolkit that turns probabilities into bits (the lm and pc
codecs, text-transform side streams, later weights, audio and KV bitstreams)
codes through this package, so encoder and decoder tables are made one way.
Names load on first use, so ``toolkit.entropy.varint`` (LEB128 counts) does not import torch.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["coder", "core", "lanes", "tables", "varint"],
    submod_attrs={
        "coder": ["CATEGORICAL", "DEFAULT_TOTAL_BITS", "MAX_TOTAL_BITS", "RangeCoder"],
        "core": ["StreamDecoder", "decode_bytes", "decode_iid", "decode_iid_groups",
            "decode_symbols", "encode_bytes", "encode_iid", "encode_iid_groups", "encode_streams",
            "encode_symbols", "freqs_to_table", "ideal_bits", "logits_to_freqs", "probs_to_freqs",
            "probs_to_table"],
        "tables": ["from_counts", "to_bytes", "from_bytes", "empirical_bits"],
    },
)
