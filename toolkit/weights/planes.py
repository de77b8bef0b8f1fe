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

from toolkit.errors import ConfigError

__all__ = ["FloatLayout", "LAYOUTS", "layout_for", "rotate", "unrotate", "byte_planes", "join_byte_planes",
           "split_symbols", "join_symbols", "pack_bits", "unpack_bits"]


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
    n = planes[0].size
    b = np.empty((n, layout.nbytes), dtype=np.uint8)
    for i, p in enumerate(planes):
        b[:, layout.nbytes - 1 - i] = p
    return unrotate(b.reshape(-1).view(layout.uint), layout)


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
