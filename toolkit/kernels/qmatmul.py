"""Dequantize-and-multiply for packed low-bit weights (W2/W3/W4/W8 with 16- or 32-bit activations).

``quant_matmul(x[..., K], packed[N, ceil(K * bits / 32)], scale[N, G], zero, bits, group_size, g_idx)``
returns ``x @ W.T`` in ``x.dtype``, where ``W[n, k] = (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]`` and
``q`` are the signed codes stored by :func:`toolkit.kernels.pack.pack_int32` (offset by
``2**(bits-1)``, one little-endian bit stream per row, code ``k`` at bit ``k * bits``).

* ``zero`` is ``None`` (symmetric), an ``[N, G]`` integer tensor (int8 zero points) or an ``[N, G]``
  float tensor; either way it is in the same signed code units as ``q``.
* ``g(k)`` is ``g_idx[k]`` when ``g_idx`` (int ``[K]``, values in ``[0, G)``) is given (act-order
  checkpoints), else ``k // group_size``; ``group_size`` of ``None`` or ``<= 0`` means one group
  per row (per-channel scales).

``W`` is formed in float32 (a small integer times a 16-bit float is exact there, so both paths
build the same ``W``) and the product is accumulated in float32; the paths differ only in the
order of that accumulation. The Triton kernel gathers each code from word ``k * bits // 32`` at
shift ``k * bits % 32``, reading the next word too where a 3-bit code straddles two.
"""

from __future__ import annotations

import math

import torch

from toolkit.kernels.backend import dispatch
from toolkit.kernels.pack import pack_int32, packed_words, unpack_int32

__all__ = ["quant_matmul", "quant_matmul_reference", "quant_matmul_triton"]

_BITS = (2, 3, 4, 8)


def _groups(group_size: int | None, k: int) -> int:
    """Group width along K: ``None`` or ``<= 0`` means the whole row."""
    return k if group_size is None or group_size <= 0 else int(group_size)


def _check(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    g_idx: torch.Tensor | None,
) -> None:
    if bits not in _BITS:
        raise ValueError(f"bits must be one of {_BITS}, got {bits}")
    if x.ndim != 2 or packed.ndim != 2 or scale.ndim != 2:
        raise ValueError("quant_matmul wants x[M, K], packed[N, words] and scale[N, G]")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    n, k = packed.shape[0], x.shape[1]
    words = packed_words(k, bits)
    if packed.shape[1] != words:
        raise ValueError(f"packed has {packed.shape[1]} words per row; K={k} at {bits} bits needs {words}")
    if scale.shape[0] != n:
        raise ValueError(f"scale has {scale.shape[0]} rows, packed has {n}")
    if zero is not None and tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"zero {tuple(zero.shape)} must match scale {tuple(scale.shape)}")
    if g_idx is None:
        need = math.ceil(k / _groups(group_size, k)) if k else 0
        if scale.shape[1] < need:
            raise ValueError(f"scale has {scale.shape[1]} groups; K={k} in groups of {group_size} needs {need}")
    elif g_idx.shape != (k,) or g_idx.dtype.is_floating_point:
        raise ValueError(f"g_idx must be an integer tensor of shape [{k}]")


def _column_groups(k: int, group_size: int | None, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(k, device=device) // _groups(group_size, k)


def quant_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference: unpack, dequantize to a float32 ``W[N, K]``, ``x @ W.T`` in float32, ``x.dtype`` out."""
    _check(x, packed, scale, zero, bits, group_size, g_idx)
    k = x.shape[1]
    q = unpack_int32(packed, bits, k).to(torch.float32)
    g = _column_groups(k, group_size, g_idx, packed.device)
    w = q
    if zero is not None:
        w = w - zero.to(torch.float32)[:, g]
    w = w * scale.to(torch.float32)[:, g]
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

# One fixed tiling, no autotuning: BLOCK_K fixes the order of the float32
# accumulation, and two processes (say an encoder and a decoder) must not get
# different sums from timing noise. tl.dot needs every tile side >= 16.
_BLOCK_N = 32
_BLOCK_K = 32
_MAX_BLOCK_M = 64


if triton is not None:

    @triton.jit
    def _quant_matmul_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
        M, N, K, WORDS, group_size,
        sxm, sxk, swn, swk, ssn, ssg, szn, szg, som, son,
        BITS: tl.constexpr, SPILL: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm = rm < M
        mn = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            xs = tl.load(
                x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                mask=mm[:, None] & mk[None, :], other=0.0,
            ).to(tl.float32)
            # W^T tile [BLOCK_K, BLOCK_N]: neighbouring k share a word, so the
            # gather re-reads each word from cache, not from memory.
            mw = mk[:, None] & mn[None, :]
            bit = rk * BITS
            widx = (bit // 32)[:, None]
            shift = (bit % 32)[:, None]
            word = tl.load(w_ptr + rn[None, :] * swn + widx * swk, mask=mw, other=0)
            # Logical shifts: as uint32 the copied sign bits never appear.
            u = word.to(tl.uint32, bitcast=True) >> shift
            if SPILL:
                nxt = tl.load(w_ptr + rn[None, :] * swn + (widx + 1) * swk, mask=mw & (widx + 1 < WORDS), other=0)
                # (v << 1) << (31 - shift) is v << (32 - shift) without a shift by 32 when shift is 0.
                u = u | ((nxt.to(tl.uint32, bitcast=True) << 1) << (31 - shift))
            q = (u & ((1 << BITS) - 1)).to(tl.int32) - (1 << (BITS - 1))
            if HAS_GIDX:
                g = tl.load(g_ptr + rk, mask=mk, other=0)
            else:
                g = rk // group_size
            s = tl.load(s_ptr + rn[None, :] * ssn + g[:, None] * ssg, mask=mw, other=0.0).to(tl.float32)
            w = q.to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + rn[None, :] * szn + g[:, None] * szg, mask=mw, other=0).to(tl.float32)
                w = w - z
            w = w * s
            # IEEE fp32, not TF32: the reference multiplies in full float32.
            acc += tl.dot(xs, w, input_precision="ieee")
        tl.store(
            out_ptr + rm[:, None] * som + rn[None, :] * son,
            acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :],
        )


def quant_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton kernel; same contract as :func:`quant_matmul_reference` (CUDA, or CPU under the interpreter)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(x, packed, scale, zero, bits, group_size, g_idx)
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    # Unused pointer arguments still need a tensor; scale stands in, never read.
    z = zero if zero is not None else scale
    gi = g_idx.to(device=x.device, dtype=torch.int32).contiguous() if g_idx is not None else scale
    block_m = min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N))
    _quant_matmul_kernel[grid](
        x, packed, scale, z, gi, out,
        m, n, k, packed.shape[1], _groups(group_size, k),
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scale.stride(0), scale.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        BITS=bits, SPILL=32 % bits != 0, HAS_ZERO=zero is not None, HAS_GIDX=g_idx is not None,
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )
    return out


def quant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[..., K] @ W.T`` for packed low-bit ``W[N, K]``: Triton on CUDA, the torch reference elsewhere."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = dispatch(quant_matmul_reference, quant_matmul_triton, x2, packed, scale, zero, bits, group_size, g_idx)
    return out.reshape(*lead, packed.shape[0])


def _example_inputs(
    bits: int = 4,
    zero: str = "int",
    g_idx: bool = False,
    dtype: str = "float32",
    m: int = 3,
    n: int = 40,
    k: int = 96,
    group_size: int = 32,
    scale_dtype: str = "float16",
    seed: int = 0,
) -> tuple[tuple, dict]:
    """Input factory for :func:`toolkit.kernels.testing.check_kernel`.

    ``zero`` is ``"none"`` (symmetric), ``"int"`` (int8 zero points) or ``"float"``
    (zero in ``scale_dtype``); ``g_idx`` shuffles the columns' groups, as an
    act-order checkpoint does. Codes are drawn from the whole signed range.
    """
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int32)
    packed = pack_int32(codes, bits)
    gs = _groups(group_size, k)
    groups = math.ceil(k / gs)
    sdt = getattr(torch, scale_dtype)
    scale = ((torch.rand(n, groups, generator=gen) + 0.5) / (1 << bits)).to(sdt)
    if zero == "none":
        zp = None
    elif zero == "int":
        zp = torch.randint(lo, hi + 1, (n, groups), generator=gen, dtype=torch.int8)
    elif zero == "float":
        zp = (torch.rand(n, groups, generator=gen) * (hi - lo) + lo).to(sdt)
    else:
        raise ValueError(f"zero must be 'none', 'int' or 'float', got {zero!r}")
    gi = None
    if g_idx:
        gi = (torch.arange(k) // gs)[torch.randperm(k, generator=gen)].to(torch.int32)
    x = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
    return (x, packed, scale, zp, bits, group_size), {"g_idx": gi}


def _example_cases(*specs: list) -> tuple[tuple, dict]:
    """Several :func:`_example_inputs` cases at once, so one interpreter subprocess checks them all."""
    return ([_example_inputs(*spec) for spec in specs],), {}


def _cases_triton(cases: list) -> tuple[torch.Tensor, ...]:
    return tuple(quant_matmul_triton(*args, **kwargs) for args, kwargs in cases)


def _cases_reference(cases: list) -> tuple[torch.Tensor, ...]:
    return tuple(quant_matmul_reference(*args, **kwargs) for args, kwargs in cases)
