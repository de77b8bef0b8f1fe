"""Lossless coding of a run of float values: byte planes with zstd, or symbols under a context model with ANS.

A *segment* is a run of whole values of one tensor (at most a container
chunk), coded on its own so segments decode independently and in parallel.
Two levels:

``fast``
    The rotated values' byte planes (:mod:`toolkit.weights.planes`): the
    exponent plane through zstd's Huffman literal coder, every other plane
    through zstd where that is smaller, stored otherwise. Decodes at zstd's
    speed; about as small as per-plane order-0 coding.

``max``
    The symbol (exponent plus top mantissa bits) is coded with rANS over
    interleaved lanes (:mod:`toolkit.entropy.lanes`) under a context: the
    value's row class and column class, classes ranked by the mean symbol of
    the row or column within the segment (weights' scales vary by output row
    and input column). The encoder tries a few numbers of classes, counts
    each option's exact cost (side data included), and keeps the smallest;
    one table per context is stored. The remainder bits are stored, or
    zstd-coded where that is smaller. Segments under 4,096 values, and
    values that repeat (where zstd's LZ stage wins), take the fast coding.

Payload layout (varints are LEB128):

    fast: 0x01, then per byte plane: mode u8 (0 stored, 1 zstd), varint length, bytes
    max:  0x02, varint row classes, varint column classes, varint lanes,
          varint length + zstd(side data: per context a bitmap of the symbols
          present, then all frequencies - 1 as u16, then the packed row and
          column classes), varint length + the lanes' words, then the
          remainder's byte planes and its packed low bits, each as mode, length, bytes

The decoder checks every count against the segment's size before it
allocates, and a damaged stream raises :class:`~toolkit.errors.FormatError`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zstandard

from toolkit.entropy.lanes import (
    MAX_SYMBOLS,
    PRECISION,
    TOTAL,
    context_tables,
    decode_lanes,
    encode_lanes,
    symbol_index,
)
from toolkit.entropy.tables import empirical_bits
from toolkit.entropy.varint import varint
from toolkit.errors import ConfigError, FormatError
from toolkit.formats.binary import ByteReader
from toolkit.weights import planes as P

__all__ = ["LEVELS", "SegmentShape", "ContextSegment", "encode_segment", "decode_segment", "read_segment",
           "plane_entropy", "zstd_compress", "zstd_decompressor", "parallel_map"]

LEVELS = ("fast", "max")
_FAST, _MAX = 1, 2
_STORED, _ZSTD = 0, 1
#: (row classes, column classes) the max level tries; the exact cost decides
_CONTEXTS = ((1, 1), (1, 4), (4, 1), (4, 4), (1, 8), (8, 8), (4, 16), (16, 16))
_MAX_CLASSES = 64
_MAX_LANES = 4096
#: ANS lanes per segment (at most one per 16,384 values): enough for a GPU to decode a segment
#: in parallel, few enough that their final states and counts (8 bytes a lane) cost under 0.01%
LANES = 64
#: values below which a context model does not pay for its tables
_MIN_CONTEXT_VALUES = 4096


@dataclass(frozen=True)
class SegmentShape:
    """Where a segment's values sit in their tensor: ``start`` (flat index) and ``row`` length."""

    start: int
    row: int

    def rows_cols(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        j = self.start + np.arange(n, dtype=np.int64)
        return j // self.row, j % self.row


# ------------------------------------------------------------------ helpers
_LOCAL = threading.local()  # zstd contexts are costly to create and not thread-safe: one per thread


def zstd_compress(data: bytes, level: int) -> bytes:
    """zstd at ``level`` with this thread's cached context."""
    cache = _LOCAL.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level].compress(data)


def zstd_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "decompressor"):
        _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return _LOCAL.decompressor


_POOL: list[ThreadPoolExecutor] = []


def parallel_map(fn, jobs: list) -> list:
    """``fn`` over ``jobs`` on all cores (the coders release the GIL); one pool for the process,
    since starting threads for every batch costs more than a small chunk's decoding."""
    if len(jobs) <= 1:
        return [fn(j) for j in jobs]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="weights"))
    return list(_POOL[0].map(fn, jobs))


def _unzstd(data: bytes, size: int, what: str) -> bytes:
    try:
        out = zstd_decompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what}: zstd data is damaged ({e})") from None
    if len(out) != size:
        raise FormatError(f"{what}: {len(out)} bytes decoded, {size} expected")
    return out


def _put_plane(out: bytearray, data: bytes, zstd_level: int) -> None:
    """A plane stored or zstd-coded, whichever is smaller."""
    packed = zstd_compress(data, zstd_level) if len(data) >= 64 else None
    if packed is not None and len(packed) < len(data):
        out += bytes([_ZSTD]) + varint(len(packed)) + packed
    else:
        out += bytes([_STORED]) + varint(len(data)) + data


def _plane(r: ByteReader, size: int) -> bytes | memoryview:
    """A plane of ``size`` bytes, stored or zstd-coded (:func:`_put_plane`)."""
    mode = r.u8()
    data = r.blob()
    if mode == _STORED:
        if len(data) != size:
            raise FormatError(f"{r.what}: stored plane of {len(data)} bytes, {size} expected")
        return data
    if mode == _ZSTD:
        return _unzstd(data, size, r.what)
    raise FormatError(f"{r.what}: unknown plane mode {mode}")


def plane_entropy(values: np.ndarray, layout: P.FloatLayout) -> list[float]:
    """Order-0 entropy in bits of each byte plane (most significant first): the bound of per-plane coding."""
    return [_entropy(p) for p in P.byte_planes(values, layout)]


def _entropy(plane: np.ndarray) -> float:
    """Order-0 entropy of a byte plane, bits per byte."""
    c = np.bincount(plane, minlength=256)
    q = c[c > 0] / plane.size
    return float(-(q * np.log2(q)).sum())


# ------------------------------------------------------------------ fast
def _encode_fast(values: np.ndarray, layout: P.FloatLayout, zstd_level: int) -> bytes:
    out = bytearray([_FAST])
    for k, p in enumerate(P.byte_planes(values, layout)):
        # the exponent plane is all literals, which level 17's parser prices best; the other planes
        # are noise in trained weights and repeat where values do (tables), which 19 finds more of
        _put_plane(out, p.tobytes(), zstd_level if k == 0 else max(zstd_level, 19))
    return bytes(out)


def _decode_fast(r: ByteReader, layout: P.FloatLayout, n: int) -> np.ndarray:
    planes = [np.frombuffer(_plane(r, n), dtype=np.uint8) for _ in range(layout.nbytes)]
    return P.join_byte_planes(planes, layout)


# ------------------------------------------------------------------ max
def _classes(stat: np.ndarray, k: int) -> np.ndarray:
    """Class 0..k-1 of each entry by rank of ``stat`` (equal shares)."""
    if k == 1:
        return np.zeros(stat.size, dtype=np.uint8)
    order = np.argsort(stat, kind="stable")
    cls = np.empty(stat.size, dtype=np.uint8)
    cls[order] = (np.arange(stat.size) * k // max(stat.size, 1)).astype(np.uint8)
    return cls


def _width(k: int) -> int:
    return max(1, (k - 1).bit_length())


def _context_ids(shape: SegmentShape, n: int, row_cls: np.ndarray, col_cls: np.ndarray | None, kc: int,
                 rows_cols: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Each value's context (row class * kc + column class), uint16; ``rows_cols`` if already computed."""
    rc = row_cls.astype(np.uint16) * np.uint16(kc)
    whole = shape.start % shape.row == 0 and n % shape.row == 0
    if kc == 1:  # no column classes (and no column-sized array: a row may be longer than the segment)
        if whole:
            return np.repeat(rc, shape.row)
        rows = rows_cols[0] if rows_cols is not None else shape.rows_cols(n)[0]
        return rc[rows - rows[0]]
    cc = col_cls.astype(np.uint16)
    if whole:  # whole rows: one broadcast
        return (rc[:, None] + cc[None, :]).reshape(-1)
    rows, cols = rows_cols if rows_cols is not None else shape.rows_cols(n)
    return rc[rows - rows[0]] + cc[cols]


def _tables(counts: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    """One table per context: ``(side bytes, freq[K, P], syms[K, P])`` (:func:`~toolkit.entropy.lanes.context_tables`).

    Side bytes: a bitmap of the symbols present in each context, then every
    table's frequencies - 1 as u16, in context order.
    """
    freq, syms = context_tables(counts)
    flat = freq[freq > 0] - 1  # row by row: each context's present symbols in order
    side = np.packbits(counts > 0, axis=1).tobytes() + flat.astype("<u2").tobytes()
    return side, freq, syms


def _cost_bits(counts: np.ndarray, freq: np.ndarray) -> float:
    """Bits of the symbols under their contexts' tables (each table lists only the symbols present)."""
    return sum(empirical_bits(row[row > 0], f[:int((row > 0).sum())], PRECISION)
               for row, f in zip(counts, freq, strict=True))


def _encode_max(values: np.ndarray, layout: P.FloatLayout, shape: SegmentShape, zstd_level: int,
                lanes: int) -> bytes:
    n = values.size // layout.nbytes
    sym, rem = P.split_symbols(values, layout)
    alphabet = 1 << layout.symbol_bits
    rows, cols = shape.rows_cols(n)
    first_row, n_rows = int(rows[0]), int(rows[-1] - rows[0] + 1)
    s64 = sym.astype(np.int64)
    row_stat = np.bincount(rows - first_row, weights=s64, minlength=n_rows) / \
        np.maximum(np.bincount(rows - first_row, minlength=n_rows), 1)
    full_cols = n >= shape.row
    col_stat = np.bincount(cols, weights=s64, minlength=shape.row) / \
        np.maximum(np.bincount(cols, minlength=shape.row), 1) if full_cols else None

    best = None
    for kr, kc in _CONTEXTS:
        if kc > 1 and (not full_cols or shape.row < 4 * kc):
            continue
        if kr > 1 and n_rows < 4 * kr:
            continue
        if kr * kc * TOTAL > max(n // 2, TOTAL):
            continue  # the decoder's tables (4096 entries a context) would cost more than the values
        row_cls = _classes(row_stat, kr)
        col_cls = _classes(col_stat, kc) if kc > 1 else None
        ctx = _context_ids(shape, n, row_cls, col_cls, kc, (rows, cols))
        counts = np.bincount(ctx.astype(np.int64) * alphabet + s64,
                             minlength=kr * kc * alphabet).reshape(kr * kc, alphabet)
        if int((counts > 0).sum(axis=1).max()) > MAX_SYMBOLS:
            continue  # the coder's tables hold 256 symbols: values this varied are near noise
        side, freq, syms = _tables(counts)
        if kr > 1:
            side += P.pack_bits(row_cls, _width(kr))
        if kc > 1:
            side += P.pack_bits(col_cls, _width(kc))
        side_z = zstd_compress(side, zstd_level)
        cost = _cost_bits(counts, freq) + 8 * len(side_z) + 32 * lanes
        if best is None or cost < best[0]:
            best = (cost, kr, kc, ctx, freq, syms, side_z)
    if best is None:
        return _encode_fast(values, layout, zstd_level)
    _, kr, kc, ctx, freq, syms, side_z = best

    index = symbol_index(freq, syms, alphabet)  # each value's place in its context's table
    ans = encode_lanes(index[ctx, sym], ctx, freq, lanes)

    out = bytearray([_MAX]) + varint(kr) + varint(kc) + varint(lanes) + varint(len(side_z)) + side_z
    out += varint(len(ans)) + ans
    _put_remainder(out, rem, layout, zstd_level)
    if _repetitive(values, layout):  # values that repeat (tables, quantized grids): LZ may win
        fast = _encode_fast(values, layout, zstd_level)
        if len(fast) < len(out):
            return fast
    return bytes(out)


def _repetitive(values: np.ndarray, layout: P.FloatLayout) -> bool:
    """Whether zstd's quickest level already codes a byte plane below its order-0 entropy: the sign
    that the values repeat, where LZ matching (the fast level) can beat the max level. Trained
    weights miss it (zstd -1 spends 0.3-25% above each plane's entropy on them); a false alarm only
    costs the time of the fast coding, since the smaller of the two is kept."""
    return any(8 * len(zstd_compress(p.tobytes(), 1)) < _entropy(p) * p.size for p in P.byte_planes(values, layout))


def _remainder_layout(layout: P.FloatLayout) -> tuple[int, int]:
    """(full bytes, leftover low bits) of the remainder."""
    return layout.remainder_bits // 8, layout.remainder_bits % 8


def _put_remainder(out: bytearray, rem: np.ndarray, layout: P.FloatLayout, zstd_level: int) -> None:
    full, low = _remainder_layout(layout)
    for k in range(full):
        shift = layout.remainder_bits - 8 * (k + 1)
        _put_plane(out, ((rem >> shift) & 0xFF).astype(np.uint8).tobytes(), zstd_level)
    if low:
        _put_plane(out, P.pack_bits((rem & ((1 << low) - 1)).astype(np.uint8), low), zstd_level)


@dataclass(frozen=True)
class ContextSegment:
    """A ``max`` segment read up to its symbols: what a lanes decoder needs, and the remainder bits.

    :func:`decode_segment` decodes the symbols on the CPU; a GPU decoder
    (:mod:`toolkit.weights.device`) takes the same fields and does the same
    on the device, so the two give the same values.
    """

    layout: P.FloatLayout
    shape: SegmentShape
    count: int
    #: the rANS lanes' stream (:mod:`toolkit.entropy.lanes`) and its number of lanes
    stream: memoryview
    lanes: int
    #: one table per context, ``[contexts, symbols]``
    freq: np.ndarray
    syms: np.ndarray
    #: each row's and each column's class; a value's context is ``row class * columns + column class``
    row_classes: np.ndarray
    col_classes: np.ndarray | None
    columns: int
    #: the remainder: its full byte planes (most significant first) and its packed low bits
    planes: list[np.ndarray]
    packed: bytes | memoryview

    def contexts(self) -> np.ndarray:
        """Each value's context, uint16."""
        return _context_ids(self.shape, self.count, self.row_classes, self.col_classes, self.columns)

    def join(self, symbols: np.ndarray) -> np.ndarray:
        """The values, as unsigned integers of the layout's width, from their decoded symbols."""
        return P.join_packed(symbols, self.planes, self.packed, self.layout)


def _read_max(r: ByteReader, layout: P.FloatLayout, shape: SegmentShape, n: int) -> ContextSegment:
    kr, kc = r.varint(_MAX_CLASSES), r.varint(_MAX_CLASSES)
    lanes = r.varint(_MAX_LANES)
    if kr < 1 or kc < 1 or lanes < 1:
        raise FormatError(f"{r.what}: {kr} x {kc} contexts over {lanes} lanes")
    k_all = kr * kc
    alphabet = 1 << layout.symbol_bits
    j_first, j_last = shape.start // shape.row, (shape.start + n - 1) // shape.row
    n_rows = j_last - j_first + 1
    if kc > 1 and n < shape.row:
        raise FormatError(f"{r.what}: column classes in a segment shorter than a row")
    side_z = r.blob()
    side_cap = k_all * alphabet * 3 + n_rows + shape.row + 16  # bitmaps, u16 frequencies, classes
    try:
        side = zstd_decompressor().decompress(side_z, max_output_size=side_cap)
    except zstandard.ZstdError as e:
        raise FormatError(f"{r.what}: side data is damaged ({e})") from None
    sr = ByteReader(side, r.what)
    bitmaps = np.unpackbits(np.frombuffer(sr.take(k_all * alphabet // 8), dtype=np.uint8)).reshape(k_all, alphabet)
    n_present = bitmaps.sum(axis=1).astype(np.int64)
    flat = np.frombuffer(sr.take(2 * int(n_present.sum())), dtype="<u2").astype(np.int64) + 1
    width = max(1, int(n_present.max()))
    freq = np.zeros((k_all, width), dtype=np.int64)
    syms = np.zeros((k_all, width), dtype=np.uint16)
    pos = 0
    for c in range(k_all):
        m = int(n_present[c])
        freq[c, :m], syms[c, :m] = flat[pos:pos + m], np.flatnonzero(bitmaps[c])
        pos += m
        if m and int(freq[c].sum()) != TOTAL:
            raise FormatError(f"{r.what}: a context table does not sum to {TOTAL}")
    row_cls = _read_classes(sr, kr, n_rows)
    col_cls = _read_classes(sr, kc, shape.row) if kc > 1 else None
    sr.done()
    stream = r.blob()
    planes, packed = _read_remainder(r, layout, n)
    return ContextSegment(layout, shape, n, stream, lanes, freq, syms, row_cls, col_cls, kc, planes, packed)


def _read_classes(sr: ByteReader, k: int, count: int) -> np.ndarray:
    if k == 1:
        return np.zeros(count, dtype=np.uint8)
    w = _width(k)
    cls = P.unpack_bits(sr.take((count * w + 7) // 8), w, count)
    if (cls >= k).any():
        raise FormatError(f"{sr.what}: class out of range")
    return cls


def _read_remainder(r: ByteReader, layout: P.FloatLayout, n: int) -> tuple[list[np.ndarray], bytes | memoryview]:
    """The remainder's full byte planes and its packed low bits."""
    full, low = _remainder_layout(layout)
    planes = [np.frombuffer(_plane(r, n), dtype=np.uint8) for _ in range(full)]
    return planes, (_plane(r, (n * low + 7) // 8) if low else b"")


# ------------------------------------------------------------------ entry points
def encode_segment(data: bytes | np.ndarray, dtype: str, shape: SegmentShape, level: str = "fast",
                   zstd_level: int = 19, lanes: int = LANES) -> bytes:
    """Code whole values of ``dtype`` (raw little-endian bytes) that start at ``shape.start`` of their tensor."""
    layout = P.layout_for(dtype)
    values = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    if values.size % layout.nbytes or values.size == 0:
        raise ConfigError(f"a {dtype} segment needs a positive whole number of {layout.nbytes}-byte values")
    n = values.size // layout.nbytes
    if level == "fast" or (level == "max" and n < _MIN_CONTEXT_VALUES):  # small: tables would cost more
        return _encode_fast(values, layout, zstd_level)
    if level == "max":
        return _encode_max(values, layout, shape, zstd_level, max(1, min(lanes, n // 16384)))
    raise ConfigError(f"weights level must be one of {LEVELS}, got {level!r}")


def read_segment(payload: bytes, dtype: str, shape: SegmentShape, count: int) -> np.ndarray | ContextSegment:
    """A segment coded by :func:`encode_segment`, read and checked: a ``fast`` one decoded (as
    :func:`decode_segment` returns it), a ``max`` one up to its symbols (a :class:`ContextSegment`)."""
    layout = P.layout_for(dtype)
    r = ByteReader(payload, f"{dtype} segment at value {shape.start}")
    if shape.row < 1 or shape.start < 0 or count < 1:
        raise FormatError(f"{r.what}: {count} values in rows of {shape.row}")
    method = r.u8()
    if method == _FAST:
        out = _decode_fast(r, layout, count).astype(layout.uint, copy=False)
    elif method == _MAX:
        out = _read_max(r, layout, shape, count)
    else:
        raise FormatError(f"{r.what}: unknown method {method}")
    r.done()
    return out


def decode_segment(payload: bytes, dtype: str, shape: SegmentShape, count: int) -> np.ndarray:
    """The ``count`` values coded by :func:`encode_segment`, as unsigned integers of the dtype's width
    (``.tobytes()`` gives the raw bytes; ``.view(np.uint8)`` writes them without a copy)."""
    seg = read_segment(payload, dtype, shape, count)
    if isinstance(seg, np.ndarray):
        return seg
    symbols = decode_lanes(seg.stream, seg.contexts(), seg.freq, seg.syms, seg.lanes)
    return seg.join(symbols).astype(seg.layout.uint, copy=False)
