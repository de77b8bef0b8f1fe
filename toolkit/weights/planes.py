"""Floats as planes of bits: the part worth entropy-coding and the part that is nearly noise.

A trained weight's exponent carries little information (about 2.6 of its 8
bits in BF16: DFloat11, "70% Size, 100% Accuracy"), its sign about 1 bit and
its mantissa nearly its full width, except the top bits, whose distribution
depends on the exponent (within an octave a bell-shaped density falls, so
the first mantissa bit is more often 0). So each value is rotated left by
one bit, which puts the exponent at the top and the sign at the bottom:

    BF16 ``s eeeeeeee mmmmmmm``  ->  ``eeeeeeee mmmmmmm s``

and split into

* the **symbol**: the exponent plus the top ``extra`` mantissa bits (10 bits
  for BF16 and FP32, 8 for FP16), coded with a context model;
* the **remainder**: the lower bits with the sign, stored (or coded where it
  pays: FP32 weights cast from BF16 have all-zero low mantissas).

For the byte-oriented coders the rotated value is also available as byte
planes, most significant first (the first plane of BF16 and FP32 is the
exponent exactly). Everything here is integer bit manipulation on numpy
arrays; splitting and joining are exact inverses for every bit pattern,
NaNs and denormals included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from toolkit.errors import ConfigError

__all__ = ["FloatLayout", "LAYOUTS", "layout_for", "rotate", "unrotate", "byte_planes", "join_byte_planes",
           "split_symbols", "join_symbols", "join_packed", "pack_bits", "unpack_bits"]


@dataclass(frozen=True)
class FloatLayout:
    """Bit layout of one IEEE-style float format."""

    name: str
    bits: int  # total width
    exponent: int  # exponent width
    extra: int  # mantissa bits coded with the exponent in the symbol

    @property
    def uint(self) -> np.dtype:
        return np.dtype(f"<u{self.bits // 8}")

    @property
    def symbol_bits(self) -> int:
        return self.exponent + self.extra

    @property
    def remainder_bits(self) -> int:
        return self.bits - self.symbol_bits

    @property
    def nbytes(self) -> int:
        return self.bits // 8


#: safetensors dtype name -> layout. ``extra`` keeps symbols at 8-12 bits (at most 4096, the
#: coder's table total): the top mantissa bits carry almost all of the mantissa's dependence
#: on the exponent.
LAYOUTS = {
    "BF16": FloatLayout("BF16", 16, 8, 2),
    "F16": FloatLayout("F16", 16, 5, 3),
    "F32": FloatLayout("F32", 32, 8, 2),
    "F64": FloatLayout("F64", 64, 11, 1),
}


def layout_for(dtype: str) -> FloatLayout:
    try:
        return LAYOUTS[dtype]
    except KeyError:
        raise ConfigError(f"no float layout for dtype {dtype!r} (known: {', '.join(LAYOUTS)})") from None


def rotate(values: np.ndarray, layout: FloatLayout) -> np.ndarray:
    """Raw values (as unsigned integers of the layout's width) rotated left by one bit."""
    v = np.ascontiguousarray(values).view(layout.uint).reshape(-1)
    return (v << 1) | (v >> (layout.bits - 1))


def unrotate(rotated: np.ndarray, layout: FloatLayout) -> np.ndarray:
    r = rotated.astype(layout.uint, copy=False)
    return (r >> 1) | (r << (layout.bits - 1))


def byte_planes(values: np.ndarray, layout: FloatLayout) -> list[np.ndarray]:
    """The rotated values' bytes, one plane per byte position, most significant first."""
    b = rotate(values, layout).view(np.uint8).reshape(-1, layout.nbytes)
    return [np.ascontiguousarray(b[:, i]) for i in range(layout.nbytes - 1, -1, -1)]


def join_byte_planes(planes: list[np.ndarray], layout: FloatLayout) -> np.ndarray:
    """Inverse of :func:`byte_planes`: one compiled pass per width (numpy's byte interleave and
    rotation take six passes and run some 30x slower)."""
    out = np.empty(planes[0].size, dtype=layout.uint)
    if layout.bits == 16:
        _join16(planes[0], planes[1], out)
    elif layout.bits == 32:
        _join32(planes[0], planes[1], planes[2], planes[3], out)
    else:
        _join64(np.stack(planes), out)
    return out


@njit(nogil=True, cache=True)
def _join16(p0, p1, out):  # pragma: no cover - compiled
    for i in range(out.size):
        r = (np.uint16(p0[i]) << np.uint16(8)) | np.uint16(p1[i])
        out[i] = (r >> np.uint16(1)) | (r << np.uint16(15))


@njit(nogil=True, cache=True)
def _join32(p0, p1, p2, p3, out):  # pragma: no cover - compiled
    for i in range(out.size):
        r = (np.uint32(p0[i]) << np.uint32(24)) | (np.uint32(p1[i]) << np.uint32(16)) \
            | (np.uint32(p2[i]) << np.uint32(8)) | np.uint32(p3[i])
        out[i] = (r >> np.uint32(1)) | (r << np.uint32(31))


@njit(nogil=True, cache=True)
def _join64(planes, out):  # pragma: no cover - compiled
    for i in range(out.size):
        r = np.uint64(0)
        for p in range(8):
            r = (r << np.uint64(8)) | np.uint64(planes[p, i])
        out[i] = (r >> np.uint64(1)) | (r << np.uint64(63))


def split_symbols(values: np.ndarray, layout: FloatLayout) -> tuple[np.ndarray, np.ndarray]:
    """``(symbols, remainders)``: the top ``symbol_bits`` and the low ``remainder_bits`` of the rotated values."""
    r = rotate(values, layout)
    shift = layout.remainder_bits
    sym = (r >> shift).astype(np.uint16)
    rem = r & ((1 << shift) - 1) if shift < 64 else r
    return sym, rem


def join_symbols(symbols: np.ndarray, remainders: np.ndarray, layout: FloatLayout) -> np.ndarray:
    r = (symbols.astype(layout.uint) << layout.remainder_bits) | remainders.astype(layout.uint, copy=False)
    return unrotate(r, layout)


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """The low ``width`` (1..8) bits of each value, packed most significant bit first.

    Eight values make ``width`` bytes: they are combined into one 64-bit word
    and its top ``width`` bytes kept (vectorized; no per-bit arrays).
    """
    if not 1 <= width <= 8:
        raise ConfigError(f"pack_bits takes widths 1..8, got {width}")
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    n = v.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:n] = v & ((1 << width) - 1)
    g = padded.reshape(groups, 8)
    word = np.zeros(groups, dtype=np.uint64)
    for i in range(8):
        word |= g[:, i] << np.uint64(width * (7 - i) + 64 - 8 * width)
    out = word.astype(">u8").view(np.uint8).reshape(groups, 8)[:, :width]
    return out.tobytes()[:(n * width + 7) // 8]


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``count`` values; ``data`` must hold ``ceil(count * width / 8)`` bytes."""
    groups = -(-count // 8)
    buf = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * width, dtype=np.uint8)
    raw = np.frombuffer(data, dtype=np.uint8)
    flat[:raw.size] = raw[:flat.size]
    buf[:, :width] = flat.reshape(groups, width)
    word = buf.view(">u8").reshape(groups)
    mask = np.uint64((1 << width) - 1)
    out = np.empty((groups, 8), dtype=np.uint8)
    for i in range(8):
        out[:, i] = (word >> np.uint64(width * (7 - i) + 64 - 8 * width)) & mask
    return out.reshape(-1)[:count]


@njit(nogil=True, cache=True)
def _join_packed(sym, planes, packed, low, bits, out):  # pragma: no cover - compiled
    """out[i] = unrotate(sym[i], planes[:, i]..., the i-th ``low``-bit field of ``packed``)."""
    k = planes.shape[0]
    mask = np.uint64((1 << low) - 1)
    top = np.uint64(bits - 1)
    full = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    n = sym.size
    start = 0
    if low:  # eight values at a time: their fields fill ``low`` whole bytes, read as one word
        sl = np.uint64(low)
        for g in range(n // 8):
            word = np.uint64(0)
            for b in range(low):
                word = (word << np.uint64(8)) | np.uint64(packed[g * low + b])
            for t in range(8):
                i = g * 8 + t
                r = np.uint64(sym[i])
                for p in range(k):
                    r = (r << np.uint64(8)) | np.uint64(planes[p, i])
                r = (r << sl) | ((word >> np.uint64(low * (7 - t))) & mask)
                out[i] = ((r >> np.uint64(1)) | ((r & np.uint64(1)) << top)) & full
        start = n // 8 * 8
    for i in range(start, n):
        r = np.uint64(sym[i])
        for p in range(k):
            r = (r << np.uint64(8)) | np.uint64(planes[p, i])
        if low:
            bit = i * low
            byte = bit >> 3
            word = (np.uint64(packed[byte]) << np.uint64(8)) | np.uint64(packed[byte + 1])
            r = (r << np.uint64(low)) | ((word >> np.uint64(16 - low - (bit & 7))) & mask)
        out[i] = ((r >> np.uint64(1)) | ((r & np.uint64(1)) << top)) & full


def join_packed(symbols: np.ndarray, planes: list[np.ndarray], packed: bytes, layout: FloatLayout) -> np.ndarray:
    """Values from symbols, the remainder's full byte planes (most significant first) and its
    packed low bits (:func:`pack_bits` of the lowest ``remainder_bits % 8``): one compiled pass."""
    n = symbols.size
    low = layout.remainder_bits % 8
    stack = np.stack(planes) if planes else np.zeros((0, n), dtype=np.uint8)
    buf = np.zeros(len(packed) + 2, dtype=np.uint8)  # two spare bytes: each field is read as 16 bits
    buf[:len(packed)] = np.frombuffer(packed, dtype=np.uint8)
    out = np.empty(n, dtype=layout.uint)
    _join_packed(np.ascontiguousarray(symbols), stack, buf, low, layout.bits, out)
    return out
