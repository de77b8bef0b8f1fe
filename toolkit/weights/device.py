"""Coded segments decoded on a device: the rANS lanes by the Triton kernel, the values joined in torch.

A context-coded (``max``) segment is read on the host up to its symbols
(:func:`~toolkit.weights.coding.read_segment`: zstd side data, tables,
classes, the remainder's planes). Then every segment's lanes of a tensor are
decoded in one launch of :func:`toolkit.kernels.rans.decode_segments` (the
Triton kernel on CUDA, the numba decoder elsewhere), each value's context is
computed on the device from its row and column class, and the symbols are
joined with their remainder bits there: the same integer arithmetic as
:func:`toolkit.weights.planes.join_packed`, so the values are the CPU
decoder's, bit for bit. What crosses to the device is the coded stream, the
tables and the remainder, not the dense values. ``fast`` segments (zstd byte
planes) decode on the host and are copied.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from toolkit.entropy.lanes import decode_table
from toolkit.kernels import rans
from toolkit.weights.checkpoint import row_length
from toolkit.weights.coding import ContextSegment, SegmentShape, parallel_map, read_segment

__all__ = ["decode_on_device"]

#: safetensors float dtype -> (torch dtype, the signed integer type of its width)
_TYPES = {"BF16": (torch.bfloat16, torch.int16), "F16": (torch.float16, torch.int16),
          "F32": (torch.float32, torch.int32), "F64": (torch.float64, torch.int64)}


def _contexts(seg: ContextSegment, device: torch.device) -> torch.Tensor:
    """Each value's context (row class * columns + column class), int32 on ``device``."""
    shape = seg.shape
    j = torch.arange(shape.start, shape.start + seg.count, dtype=torch.int64, device=device)
    rows = j // shape.row - shape.start // shape.row
    ctx = torch.from_numpy(seg.row_classes.astype(np.int32)).to(device)[rows] * seg.columns
    if seg.col_classes is not None:
        ctx += torch.from_numpy(seg.col_classes.astype(np.int32)).to(device)[j % shape.row]
    return ctx


def _join(seg: ContextSegment, symbols: torch.Tensor) -> torch.Tensor:
    """The values' bits (int64) from symbols and the remainder: ``unrotate(symbol << r | remainder)``.

    The rotation is undone without forming the rotated value, which needs 64
    unsigned bits for F64: its top ``bits - 1`` bits are the value's low
    ones, and the remainder's lowest bit is the sign.
    """
    layout, device, n = seg.layout, symbols.device, seg.count
    rem = torch.zeros(n, dtype=torch.int64, device=device)
    for plane in seg.planes:  # the remainder's full bytes, most significant first
        rem = (rem << 8) | torch.from_numpy(plane.copy()).to(device).long()
    low = layout.remainder_bits % 8
    if low:  # fields of ``low`` bits packed most significant first; each is read from the 16 bits around it
        packed = np.zeros(len(seg.packed) + 2, dtype=np.uint8)
        packed[:len(seg.packed)] = np.frombuffer(seg.packed, dtype=np.uint8)
        buf = torch.from_numpy(packed).to(device).long()
        bit = torch.arange(n, dtype=torch.int64, device=device) * low
        word = (buf[bit >> 3] << 8) | buf[(bit >> 3) + 1]
        rem = (rem << low) | ((word >> (16 - low - (bit & 7))) & ((1 << low) - 1))
    sign = -(1 << 63) if layout.bits == 64 else 1 << (layout.bits - 1)
    return (symbols.to(torch.int64) << (layout.remainder_bits - 1)) | (rem >> 1) | ((rem & 1) * sign)


def decode_on_device(segments: list[tuple[int, int, bytes]], dtype: str, shape: tuple[int, ...],
                     device: torch.device | str) -> torch.Tensor:
    """The ``dtype`` tensor of ``shape`` whose values ``segments`` code, decoded on ``device``.

    ``segments``: ``(first value, count, payload)`` of
    :func:`~toolkit.weights.coding.encode_segment` payloads, rows of
    :func:`~toolkit.weights.checkpoint.row_length` values.
    """
    device = torch.device(device)
    float_type, int_type = _TYPES[dtype]
    row = row_length(tuple(shape))
    read = parallel_map(lambda s: read_segment(s[2], dtype, SegmentShape(s[0], row), s[1]), segments)
    out = torch.empty(math.prod(shape), dtype=int_type, device=device)
    coded = [(v0, seg) for (v0, _, _), seg in zip(segments, read, strict=True) if isinstance(seg, ContextSegment)]
    for (v0, n, _), seg in zip(segments, read, strict=True):
        if isinstance(seg, np.ndarray):  # a fast segment, decoded on the host
            out[v0:v0 + n] = torch.from_numpy(seg.view(f"<i{seg.itemsize}")).to(device)
    lanes = [(seg.stream, _contexts(seg, device), torch.from_numpy(decode_table(seg.freq)),
              torch.from_numpy(seg.syms.astype(np.int32)), seg.lanes) for _, seg in coded]
    for (v0, seg), symbols in zip(coded, rans.decode_segments(lanes, device), strict=True):
        bits = _join(seg, symbols)
        if seg.layout.bits < 64:  # the unsigned pattern as the signed integer of its width
            bits = bits - ((bits >> (seg.layout.bits - 1)) << seg.layout.bits)
        out[v0:v0 + seg.count] = bits.to(int_type)
    return out.view(float_type).reshape(shape)
