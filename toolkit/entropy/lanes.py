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

from toolkit.entropy.tables import from_counts
from toolkit.errors import ConfigError, FormatError

__all__ = ["PRECISION", "TOTAL", "MAX_SYMBOLS", "context_tables", "symbol_index", "encode_lanes", "decode_lanes",
           "decode_table", "split_stream", "decode_words"]

PRECISION = 12
TOTAL = 1 << PRECISION
_LOW = 1 << 16
#: symbols per table (the decoder packs a table index into 8 bits)
MAX_SYMBOLS = 256


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
def _decode(words, starts, ends, ctx, table, syms, out):  # pragma: no cover - compiled
    lanes = starts.size
    x = np.empty(lanes, dtype=np.uint32)
    ptr = starts.copy()
    for j in range(lanes):
        if ptr[j] + 2 > ends[j]:
            return 1
        x[j] = (np.uint32(words[ptr[j]]) << np.uint32(16)) | np.uint32(words[ptr[j] + 1])
        ptr[j] += 2
    # round by round over the lanes, renormalizing without a branch: about 25% faster here; a
    # lane that would read past its words reads 0 and is caught by the end check below
    n = out.size
    i = 0
    while i < n:
        m = min(lanes, n - i)
        for j in range(m):
            c = ctx[i + j]
            s = x[j]
            e = table[c, s & np.uint32(TOTAL - 1)]
            s = (((e >> np.uint32(12)) & np.uint32(0xFFF)) + np.uint32(1)) * (s >> np.uint32(PRECISION)) \
                + (e & np.uint32(0xFFF))
            p = ptr[j]
            need = s < np.uint32(_LOW)
            w = np.uint32(words[p]) if p < ends[j] else np.uint32(0)
            x[j] = (s << np.uint32(16)) | w if need else s
            ptr[j] = p + 1 if need else p
            out[i + j] = syms[c, e >> np.uint32(24)]
        i += m
    for j in range(lanes):
        if x[j] != np.uint32(_LOW) or ptr[j] != ends[j]:
            return 1
    return 0


#: the compiled decoder itself, ``(words, starts, ends, ctx, table, syms, out) -> 0 or 1 (damaged)``,
#: for callers (the GPU kernel's reference) that hold the stream already split
decode_words = _decode


def context_tables(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One static table per context from symbol counts ``[contexts, alphabet]``: ``(freq, syms)``.

    Both are ``[contexts, P]``, P the most symbols present in any context: row
    ``c`` lists the symbols seen in context ``c`` in increasing order
    (``syms``) with frequencies of total ``2**PRECISION``
    (:func:`toolkit.entropy.tables.from_counts`), then zeros. A context with no
    symbols gets an empty table.
    """
    present = [np.flatnonzero(row) for row in counts]
    width = max(1, max(p.size for p in present))
    freq = np.zeros((counts.shape[0], width), dtype=np.int64)
    syms = np.zeros((counts.shape[0], width), dtype=np.uint16)
    for c, p in enumerate(present):
        if p.size:
            freq[c, :p.size] = from_counts(counts[c, p], total_bits=PRECISION)
            syms[c, :p.size] = p
    return freq, syms


def symbol_index(freq: np.ndarray, syms: np.ndarray, alphabet: int) -> np.ndarray:
    """``index[c, s]``: where symbol ``s`` sits in context ``c``'s table, what :func:`encode_lanes` codes."""
    index = np.zeros((freq.shape[0], alphabet), dtype=np.uint16)
    for c in range(freq.shape[0]):
        m = int((freq[c] > 0).sum())
        index[c, syms[c, :m]] = np.arange(m, dtype=np.uint16)
    return index


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


def decode_table(freq: np.ndarray) -> np.ndarray:
    """``[contexts, 2**12]`` uint32: for each slot, ``index << 24 | (freq - 1) << 12 | (slot - cum)``.

    One load per decoded symbol gives the table index, its frequency and the
    offset of the slot within it; tables hold at most 256 symbols.
    """
    freq = _check_tables(freq)
    if freq.shape[1] > MAX_SYMBOLS:
        raise ConfigError(f"tables hold at most {MAX_SYMBOLS} symbols, got {freq.shape[1]}")
    out = np.zeros((freq.shape[0], TOTAL), dtype=np.uint32)
    _fill_table(freq, out)
    return out


@njit(nogil=True, cache=True)
def _fill_table(freq, out):  # pragma: no cover - compiled
    for c in range(freq.shape[0]):
        slot = 0
        for k in range(freq.shape[1]):
            for b in range(freq[c, k]):
                out[c, slot] = np.uint32((k << 24) | ((freq[c, k] - 1) << 12) | b)
                slot += 1


def encode_lanes(idx: np.ndarray, ctx: np.ndarray, freq: np.ndarray, lanes: int = 64) -> bytes:
    """Code ``idx[i]`` (an index into table ``ctx[i]`` of ``freq[contexts, symbols]``) over ``lanes`` lanes."""
    freq = _check_tables(freq)
    idx = np.ascontiguousarray(idx, dtype=np.uint16).reshape(-1)
    ctx = np.ascontiguousarray(ctx, dtype=np.uint16).reshape(-1)
    if idx.size != ctx.size:
        raise ConfigError("one context per symbol")
    if freq.shape[1] > MAX_SYMBOLS:
        raise ConfigError(f"tables hold at most {MAX_SYMBOLS} symbols, got {freq.shape[1]}")
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


def split_stream(data: bytes, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(word counts int64[lanes], words uint16)`` of a stream, its header checked against its size."""
    if lanes < 1:  # lanes comes from the stream; 0 lanes would never finish a round
        raise FormatError(f"ANS lanes: {lanes} lanes")
    if len(data) < 4 * lanes:
        raise FormatError("ANS lanes: truncated")
    counts = np.frombuffer(data, dtype="<u4", count=lanes).astype(np.int64)
    body = len(data) - 4 * lanes
    if body % 2 or int(counts.sum()) * 2 != body:
        raise FormatError("ANS lanes: word counts do not match the data")
    return counts, np.frombuffer(data, dtype="<u2", offset=4 * lanes)


def decode_lanes(data: bytes, ctx: np.ndarray, freq: np.ndarray, syms: np.ndarray, lanes: int = 64,
                 table: np.ndarray | None = None) -> np.ndarray:
    """Decode ``ctx.size`` symbols: ``syms[c, k]`` for table index ``k`` of context ``c``.

    ``freq`` and ``syms`` are ``[contexts, symbols]``; ``table`` is
    :func:`decode_table` of ``freq`` (computed if not given). Every context in
    ``ctx`` must have a non-empty table.
    """
    freq = _check_tables(freq)
    ctx = np.ascontiguousarray(ctx, dtype=np.uint16).reshape(-1)
    # A context past the tables would read out of bounds; one with an empty table reads zeros
    # (memory-safe: the states collapse and the end check reports damage), so only the first is
    # checked here, in one pass rather than a count per context.
    if ctx.size and int(ctx.max()) >= freq.shape[0]:
        raise FormatError("a value's context has no table")
    if freq.shape[1] > MAX_SYMBOLS:
        raise FormatError(f"tables of {freq.shape[1]} symbols (at most {MAX_SYMBOLS})")
    counts, words = split_stream(data, lanes)
    ends = np.cumsum(counts)
    starts = ends - counts
    out = np.empty(ctx.size, dtype=np.asarray(syms).dtype)
    table = decode_table(freq) if table is None else table
    if _decode(words, starts, ends, ctx, table, np.ascontiguousarray(syms), out):
        raise FormatError("ANS-coded data is damaged")
    return out
