"""Packing of low-bit integer codes into int32 words: the weight layout :mod:`toolkit.kernels.qmatmul` reads.

The layout is compressed-tensors' ``pack-quantized`` (what vLLM serves):
signed codes ``q in [-2**(b-1), 2**(b-1) - 1]`` are offset to unsigned
``q + 2**(b-1)`` and written as one little-endian bit stream per row, code
``i`` at bit ``i * b``; word ``j`` holds bits ``32j .. 32j + 31``. A row of
``n`` codes takes ``ceil(n * b / 32)`` words. For 2, 4 and 8 bits every code
sits inside one word; 3-bit codes straddle word boundaries, so no bit is
wasted.
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = ["pack_int32", "unpack_int32", "packed_words"]


def packed_words(length: int, bits: int) -> int:
    return math.ceil(length * bits / 32)


def _positions(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit codes (a 2-D integer tensor) into int32 along ``dim``."""
    if codes.dim() != 2:
        raise ValueError("pack_int32 takes a 2-D tensor")
    value = codes.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        value = value.t()
    rows, cols = value.shape
    # 32 codes fill exactly ``bits`` words: pack in runs of 32.
    runs = math.ceil(cols / 32)
    value = torch.nn.functional.pad(value, (0, runs * 32 - cols)).reshape(rows * runs, 32)
    word, offset = _positions(bits, value.device)
    out = torch.zeros(rows * runs, bits + 1, dtype=torch.int64, device=value.device)
    out.scatter_add_(1, word.expand_as(value), (value << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32
    if bool(spill.any()):
        out.scatter_add_(1, (word[spill] + 1).expand(value.shape[0], -1),
                         value[:, spill] >> (32 - offset[spill]))
    out = out[:, :bits].reshape(rows, runs * bits)[:, : packed_words(cols, bits)]
    packed = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return packed.t().contiguous() if dim == 0 else packed.contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 signed codes, ``length`` of them along ``dim``."""
    if dim == 0:
        packed = packed.t()
    rows = packed.shape[0]
    if 32 % bits == 0 and sys.byteorder == "little":
        # Codes never straddle bytes: on a little-endian machine the words'
        # bytes are the stream in order, and byte-wide shifts unpack them.
        data = packed.contiguous().view(torch.uint8)
        if bits == 8:
            value = data
        else:
            shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
            value = ((data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)
        codes = (value[:, :length].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        return codes.t().contiguous() if dim == 0 else codes.contiguous()
    words = packed.to(torch.int64) & 0xFFFFFFFF
    # One spare zero word so that a straddling code can always read its next word.
    words = torch.nn.functional.pad(words, (0, 1))
    start = torch.arange(length, device=packed.device, dtype=torch.int64) * bits
    idx, offset = start // 32, start % 32
    low = words[:, idx] >> offset
    high = words[:, idx + 1] << (32 - offset)
    value = (low | high) & ((1 << bits) - 1)
    codes = (value - (1 << (bits - 1))).to(torch.int8).reshape(rows, length)
    return codes.t().contiguous() if dim == 0 else codes.contiguous()
