"""Interleaved rANS with a context per symbol: static tables, many lanes, decodable in parallel.

Why hand-written rather than constriction: a context model over weights
switches tables at every symbol, and constriction's Python API decodes a
run under one model per call (about 60M symbols/s here, and only after the
symbols are grouped by context and scattered back). This coder takes each
symbol's context from an array and decodes in one compiled loop (numba,
without the GIL, so segments decode on all cores), and its layout is what a
GPU decodes in parallel: symbol ``i`` belongs to lane ``i % lanes``, and
every lane is an independent rANS stream with its own words.

The coder is the classic 32-bit rANS with 16-bit renormalization (Duda;
Giesen's ryg_rans layout): state ``x`` in ``[2**16, 2**32)``, tables of total
``2**12``, at most one 16-bit word read per symbol. Encoding runs backwards;
each lane's words are stored in decoding order, its final state first.

Stream layout: ``lanes`` u32 word counts, then every lane's u16 words in
lane order. A decoder that runs past a lane's words, or does not end every
lane in the encoder's initial state with all words read, reports damage.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from toolkit.errors import ConfigError, FormatError

__all__ = ["PRECISION", "TOTAL", "encode_lanes", "decode_lanes", "slot_table"]

PRECISION = 12
TOTAL = 1 << PRECISION
_LOW = 1 << 16


@njit(nogil=True, cache=True)
def _encode(idx, ctx, freq, cum, lanes, buf, used):  # pragma: no cover - compiled
    n = idx.size
    x = np.full(lanes, _LOW, dtype=np.uint64)
    for i in range(n - 1, -1, -1):
        j = i % lanes
        c = ctx[i]
        k = idx[i]
        f = np.uint64(freq[c, k])
        s = x[j]
        if s >= (f << np.uint64(32 - PRECISION)):
            buf[j, used[j]] = np.uint16(s & np.uint64(0xFFFF))
            used[j] += 1
            s >>= np.uint64(16)
        x[j] = ((s // f) << np.uint64(PRECISION)) + (s % f) + np.uint64(cum[c, k])
    for j in range(lanes):
        buf[j, used[j]] = np.uint16(x[j] & np.uint64(0xFFFF))
        buf[j, used[j] + 1] = np.uint16(x[j] >> np.uint64(16))
        used[j] += 2


@njit(nogil=True, cache=True)
def _decode(words, starts, ends, ctx, slots, freq, cum, syms, out):  # pragma: no cover - compiled
    lanes = starts.size
    x = np.empty(lanes, dtype=np.uint32)
    ptr = starts.copy()
    for j in range(lanes):
        if ptr[j] + 2 > ends[j]:
            return 1
        x[j] = (np.uint32(words[ptr[j]]) << np.uint32(16)) | np.uint32(words[ptr[j] + 1])
        ptr[j] += 2
    j = 0
    for i in range(out.size):
        c = ctx[i]
        s = x[j]
        slot = s & np.uint32(TOTAL - 1)
        k = slots[c, slot]
        s = np.uint32(freq[c, k]) * (s >> np.uint32(PRECISION)) + slot - np.uint32(cum[c, k])
        if s < np.uint32(_LOW):
            if ptr[j] >= ends[j]:
                return 1
            s = (s << np.uint32(16)) | np.uint32(words[ptr[j]])
            ptr[j] += 1
        x[j] = s
        out[i] = syms[c, k]
        j += 1
        if j == lanes:
            j = 0
    for j in range(lanes):
        if x[j] != np.uint32(_LOW) or ptr[j] != ends[j]:
            return 1
    return 0


def _cum(freq: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((freq.shape[0], 1), np.int64), np.cumsum(freq, axis=1)[:, :-1]], axis=1)


def _check_tables(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.int64)
    if freq.ndim != 2 or (freq < 0).any():
        raise ConfigError("tables must be a [contexts, symbols] array of frequencies >= 0")
    sums = freq.sum(axis=1)
    if ((sums != TOTAL) & (sums != 0)).any():
        raise ConfigError(f"every table must sum to 2**{PRECISION} (or be empty)")
    return freq


def slot_table(freq: np.ndarray) -> np.ndarray:
    """``[contexts, 2**12]``: the table index each slot of each context decodes to."""
    freq = _check_tables(freq)
    out = np.zeros((freq.shape[0], TOTAL), dtype=np.uint16)
    for c, row in enumerate(freq):
        if row.sum():
            out[c] = np.repeat(np.arange(row.size, dtype=np.uint16), row)
    return out


def encode_lanes(idx: np.ndarray, ctx: np.ndarray, freq: np.ndarray, lanes: int = 64) -> bytes:
    """Code ``idx[i]`` (an index into table ``ctx[i]`` of ``freq[contexts, symbols]``) over ``lanes`` lanes."""
    freq = _check_tables(freq)
    idx = np.ascontiguousarray(idx, dtype=np.uint16).reshape(-1)
    ctx = np.ascontiguousarray(ctx, dtype=np.uint16).reshape(-1)
    if idx.size != ctx.size:
        raise ConfigError("one context per symbol")
    if not 1 <= lanes <= 65536:
        raise ConfigError(f"lanes must be in 1..65536, got {lanes}")
    if idx.size:
        if int(ctx.max()) >= freq.shape[0] or int(idx.max()) >= freq.shape[1]:
            raise ConfigError("context or symbol outside the tables")
        if (freq[ctx, idx] == 0).any():
            raise ConfigError("a symbol with frequency 0 in its context")
    per_lane = -(-idx.size // lanes) + 2
    buf = np.zeros((lanes, per_lane), dtype=np.uint16)
    used = np.zeros(lanes, dtype=np.int64)
    _encode(idx, ctx, freq, _cum(freq), lanes, buf, used)
    counts = used.astype("<u4")
    words = np.concatenate([buf[j, :used[j]][::-1] for j in range(lanes)]).astype("<u2")
    return counts.tobytes() + words.tobytes()


def decode_lanes(data: bytes, ctx: np.ndarray, freq: np.ndarray, syms: np.ndarray, lanes: int = 64,
                 slots: np.ndarray | None = None) -> np.ndarray:
    """Decode ``ctx.size`` symbols: ``syms[c, k]`` for table index ``k`` of context ``c``.

    ``freq`` and ``syms`` are ``[contexts, symbols]``; ``slots`` is
    :func:`slot_table` of ``freq`` (computed if not given). Every context in
    ``ctx`` must have a non-empty table.
    """
    freq = _check_tables(freq)
    ctx = np.ascontiguousarray(ctx, dtype=np.uint16).reshape(-1)
    if ctx.size:
        used = np.bincount(ctx, minlength=freq.shape[0])
        if used.size > freq.shape[0] or ((used > 0) & (freq.sum(axis=1) == 0)).any():
            raise FormatError("a value's context has no table")
    if len(data) < 4 * lanes:
        raise FormatError("ANS lanes: truncated")
    counts = np.frombuffer(data, dtype="<u4", count=lanes).astype(np.int64)
    body = len(data) - 4 * lanes
    if body % 2 or int(counts.sum()) * 2 != body:
        raise FormatError("ANS lanes: word counts do not match the data")
    words = np.frombuffer(data, dtype="<u2", offset=4 * lanes)
    ends = np.cumsum(counts)
    starts = ends - counts
    out = np.empty(ctx.size, dtype=np.asarray(syms).dtype)
    slots = slot_table(freq) if slots is None else slots
    if _decode(words, starts, ends, ctx, slots, freq, _cum(freq), np.ascontiguousarray(syms), out):
        raise FormatError("ANS-coded data is damaged")
    return out
