"""The integer lm engine's two core operations on a GPU: int8 rows, and an int8 linear layer with requantization.

``quant_rows(x)``: rows of int64 ``x`` ``[M, K]`` as int8 ``round(x * 127 / m)`` with ``m = max |x|``
per row (at least 1), through the reciprocal ``127 * 2**55 // m``; returns ``(q, m)``.

``int_linear(q, r, w, m)``: ``q`` int8 ``[M, K]`` rows standing for ``q[i] * r[i] / (127 * 2**16)``,
``w`` int8 ``[N, K]`` with multipliers ``m`` (int64 ``[N]``); returns the int64 product in Q16:
``rshr(rshr(acc * m, 20) * r, 14)`` with ``acc = q @ w.T`` accumulated exactly in int32
(``|acc| <= 127**2 * K < 2**24``) and ``rshr(x, n) = (x + 2**(n-1)) >> n``.

Every step is integer arithmetic, so the Triton kernels return the same integers as the torch
references and as the CPU engine's compiled loops (:mod:`toolkit.text.intkernels`): the lm codec's
integer files mean the same numbers on any device.
"""

from __future__ import annotations

import torch

from toolkit.kernels.backend import dispatch

__all__ = ["int_linear", "int_linear_reference", "int_linear_triton", "quant_rows", "quant_rows_reference",
           "quant_rows_triton"]

_COL_SHIFT = 20  # COL_BITS (34) - 14: the multipliers' first shift
_ROW_SHIFT = 14


def _rshr(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x + (1 << (n - 1))) >> n


def quant_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.abs().amax(dim=-1).clamp_min(1)
    recip = (127 << 55) // m
    return _rshr(x * recip[:, None], 55).to(torch.int8), m


def int_linear_reference(q: torch.Tensor, r: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # float64 holds the int8 products and their sums exactly (below 2**24), on every device
    acc = (q.double() @ w.double().T).long()
    return _rshr(_rshr(acc * m[None, :], _COL_SHIFT) * r[:, None], _ROW_SHIFT)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, m_ptr, K, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0)
        mx = tl.maximum(tl.max(tl.abs(x), axis=0), 1)
        recip = (tl.full([], 127, tl.int64) << 55) // mx
        q = (x * recip + (1 << 54)) >> 55
        tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=cols < K)
        tl.store(m_ptr + row, mx)

    @triton.jit
    def _int_linear_kernel(q_ptr, r_ptr, w_ptr, m_ptr, out_ptr, M, N, K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(q_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                        other=0)
            b = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=(cols[None, :] < N) & (kk[:, None] < K),
                        other=0)
            # int32 accumulation: |acc| <= 127**2 * K < 2**24, exact in any order
            acc += tl.dot(a, b, out_dtype=tl.int32)
        mult = tl.load(m_ptr + cols, mask=cols < N, other=0)
        r = tl.load(r_ptr + rows, mask=rows < M, other=0)
        y = (acc.to(tl.int64) * mult[None, :] + (1 << 19)) >> 20
        y = (y * r[:, None] + (1 << 13)) >> 14
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], y, mask=(rows[:, None] < M) & (cols[None, :] < N))

except ImportError:  # pragma: no cover - Triton ships with torch on Linux
    triton = None


def quant_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous().long()
    rows, k = x.shape
    q = torch.empty((rows, k), dtype=torch.int8, device=x.device)
    m = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        _quant_rows_kernel[(rows,)](x, q, m, k, BLOCK=triton.next_power_of_2(max(k, 16)))
    return q, m


def int_linear_triton(q: torch.Tensor, r: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    q, w = q.contiguous(), w.contiguous()
    r, m = r.contiguous().long(), m.contiguous().long()
    rows, k = q.shape
    n = w.shape[0]
    out = torch.empty((rows, n), dtype=torch.int64, device=q.device)
    grid = (triton.cdiv(rows, 16), triton.cdiv(n, 32))
    _int_linear_kernel[grid](q, r, w, m, out, rows, n, k, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    return out


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch(quant_rows_reference, quant_rows_triton, x)


def int_linear(q: torch.Tensor, r: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return dispatch(int_linear_reference, int_linear_triton, q, r, w, m)


def _example_inputs(rows: int, k: int, n: int, seed: int = 0) -> tuple[tuple, dict]:
    """Rows and weights with the engine's ranges: Q16 activations up to 2**26, multipliers up to 2**20."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(1 << 26), 1 << 26, (rows, k), generator=g) >> torch.randint(0, 20, (rows, 1), generator=g)
    q, mx = quant_rows_reference(x)
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    mult = torch.randint(1, 1 << 20, (n,), generator=g)
    r = torch.randint(1, 1 << 20, (rows,), generator=g)
    return (q, r, w, mult), {}


def _example_rows(rows: int, k: int, seed: int = 0) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(1 << 26), 1 << 26, (rows, k), generator=g) >> torch.randint(0, 24, (rows, 1), generator=g)
    x[0] = 0  # an all-zero row: its scale is 1
    return (x,), {}
