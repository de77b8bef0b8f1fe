"""Static frequency tables: made from counts, written into a payload, read back bounded, and costed.

A static table is coded once ahead of the symbols it models (a KV stream's
codes, a weights context, an audio codebook's prior). :func:`from_counts`
makes it with integer arithmetic only, so encoder and decoder agree on every
machine; :func:`to_bytes` / :func:`from_bytes` carry it as varints (the
alphabet, then each frequency), read back through a bounded reader so that a
forged table is refused before anything is allocated; :func:`empirical_bits`
is what coding the counted symbols under a table costs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from toolkit.entropy.varint import varint
from toolkit.errors import ConfigError, FormatError

__all__ = ["from_counts", "to_bytes", "from_bytes", "empirical_bits"]


class _Reader(Protocol):  # toolkit.formats.binary.ByteReader, which sits above this leaf
    what: str

    def varint(self, limit: int) -> int: ...


def from_counts(counts: np.ndarray, total_bits: int = 16) -> np.ndarray:
    """Integer frequencies summing to ``2**total_bits`` from symbol counts; absent symbols get 0.

    Each present symbol gets at least 1; the rounding remainder goes to the
    most frequent one. Integer arithmetic only, so the table is the same everywhere.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    total = 1 << total_bits
    present = c > 0
    if present.sum() == 0:
        raise ConfigError("a frequency table needs at least one symbol")
    if present.sum() > total:
        raise ConfigError(f"{int(present.sum())} symbols do not fit a total of 2**{total_bits}")
    f = np.where(present, np.maximum(1, (c * total) // c.sum()), 0)
    diff = total - int(f.sum())
    order = np.argsort(-f, kind="stable")
    i = 0
    while diff != 0:
        j = order[i % int(present.sum())]
        step = 1 if diff > 0 else -1
        if step > 0 or f[j] > 1:
            f[j] += step
            diff -= step
        i += 1
    return f


def to_bytes(freqs: np.ndarray) -> bytes:
    """``freqs`` as varints: the alphabet size, then each symbol's frequency (0 for an absent symbol)."""
    f = np.asarray(freqs, dtype=np.int64).reshape(-1)
    return varint(f.size) + b"".join(varint(int(x)) for x in f)


def from_bytes(reader: _Reader, limit: int, total_bits: int = 16) -> np.ndarray:
    """The table :func:`to_bytes` wrote, of at most ``limit`` symbols, refused unless it sums to ``2**total_bits``."""
    total = 1 << total_bits
    k = reader.varint(limit)
    freqs = np.array([reader.varint(total) for _ in range(k)], dtype=np.int64)
    if k == 0 or int(freqs.sum()) != total:
        raise FormatError(f"{reader.what}: a frequency table does not sum to 2**{total_bits}")
    return freqs


def empirical_bits(counts: np.ndarray, freqs: np.ndarray, total_bits: int = 16) -> float:
    """Bits to code symbols seen ``counts`` times under ``freqs`` (``inf`` where a seen symbol has frequency 0)."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    f = np.asarray(freqs, dtype=np.float64).reshape(-1)[:c.size]
    seen = c > 0
    if (f[seen] == 0).any():
        return float("inf")
    return float((c[seen] * (total_bits - np.log2(f[seen]))).sum())
