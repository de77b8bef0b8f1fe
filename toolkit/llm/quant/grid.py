"""The integer grid: scales, zero points, rounding and its inverse.

Conventions follow compressed-tensors, so a checkpoint written here
dequantizes to the same numbers there: codes are signed,
``q in [-2**(b-1), 2**(b-1) - 1]``, and ``w = (q - zero) * scale``.

- symmetric: ``zero = 0`` and ``scale = max|w| / ((2**b - 1) / 2)``;
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` maps onto the grid and the
  zero point is the integer code of 0.0.

Scales are rounded to their storage dtype *before* the codes are chosen, so the
codes are the best ones for the scale that is actually stored.
"""

from __future__ import annotations

import torch

__all__ = ["qrange", "find_params", "quantize", "dequantize", "fake_quantize"]


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def find_params(w: torch.Tensor, bits: int, symmetric: bool,
                scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``w`` ([rows, cols]) from its min and max.

    Returns float32 tensors of shape [rows]: the scale (already rounded through
    ``scale_dtype``) and the integer-valued zero point.
    """
    qmin, qmax = qrange(bits)
    w = w.float()
    lo = torch.clamp(w.amin(dim=1), max=0.0)
    hi = torch.clamp(w.amax(dim=1), min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    # An all-zero row has no range; any positive scale codes it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_dtype).float()
    # A scale that underflowed in a 16-bit dtype would make every code clip.
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.clamp(scale, min=tiny)
    if not symmetric:
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` (float32) for per-row (``[rows]``) or broadcastable ``scale`` and ``zero``; float32 result."""
    qmin, qmax = qrange(bits)
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w.float() / scale + zero), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return (q.float() - zero.float()) * scale.float()


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits), scale, zero)
