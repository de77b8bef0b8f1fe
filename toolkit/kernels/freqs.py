"""Logits to integer frequency tables: the entropy core's quantization step.

``logits_to_freqs(logits[..., K], total_bits)`` returns int64 tables that sum
to ``2**total_bits`` with a floor of 1 per symbol (softmax, then
``1 + floor(p * (T - K))``, remainder to the most probable symbol). The
torch reference is :func:`toolkit.entropy.logits_to_freqs`; the Triton
kernel does the same in one pass per row on the GPU, so a model running on
CUDA never ships its logits to the host. Encoder and decoder must use the
same path: the two agree on invariants, not on every last count.
"""

from __future__ import annotations

import torch

from toolkit.entropy.core import DEFAULT_TOTAL_BITS, _check_total
from toolkit.entropy.core import logits_to_freqs as logits_to_freqs_reference
from toolkit.kernels.backend import dispatch

__all__ = ["logits_to_freqs", "logits_to_freqs_reference", "logits_to_freqs_triton"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


if triton is not None:

    @triton.jit
    def _freqs_kernel(x_ptr, out_ptr, K, stride_x, stride_o, spare, total, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        x_row = x_ptr + row * stride_x
        o_row = out_ptr + row * stride_o
        # pass 1: row maximum (fp32 whatever the input dtype)
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=float("-inf")).to(tl.float32)
            m = tl.maximum(m, v)
        mx = tl.max(m, axis=0)
        # pass 2: softmax denominator
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=float("-inf")).to(tl.float32)
            acc += tl.where(offs < K, tl.exp(v - mx), 0.0)
        denom = tl.sum(acc, axis=0)
        # pass 3: counts, their sum, and the first index of the largest count
        fsum = tl.zeros((BLOCK,), tl.int64)
        best_val = tl.full((1,), -1, tl.int64)
        best_idx = tl.full((1,), 0, tl.int64)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < K
            v = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            p = tl.exp(v - mx) / denom
            f = tl.floor(p * spare).to(tl.int64) + 1
            f = tl.where(mask, f, 0)
            tl.store(o_row + offs, f, mask=mask)
            fsum += f
            bmax = tl.max(f, axis=0)
            barg = tl.argmax(f, axis=0).to(tl.int64) + start
            better = bmax > best_val
            best_idx = tl.where(better, barg, best_idx)
            best_val = tl.where(better, bmax, best_val)
        rem = total - tl.sum(fsum, axis=0)
        ptr = o_row + best_idx
        tl.store(ptr, best_val + rem)


def logits_to_freqs_triton(logits: torch.Tensor, total_bits: int = DEFAULT_TOTAL_BITS) -> torch.Tensor:
    """Triton path: same contract as the reference; runs on CUDA or the CPU interpreter."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    k = logits.shape[-1]
    total = _check_total(total_bits, k)
    x = logits.detach().reshape(-1, k).contiguous()
    out = torch.empty(x.shape, dtype=torch.int64, device=x.device)
    block = min(4096, triton.next_power_of_2(k))
    if x.shape[0]:
        _freqs_kernel[(x.shape[0],)](x, out, k, x.stride(0), out.stride(0), float(total - k), total, BLOCK=block)
    return out.reshape(logits.shape)


def logits_to_freqs(logits: torch.Tensor, total_bits: int = DEFAULT_TOTAL_BITS) -> torch.Tensor:
    """Integer frequency tables from logits: Triton on CUDA, the torch reference elsewhere."""
    return dispatch(logits_to_freqs_reference, logits_to_freqs_triton, logits, total_bits)


def _example_inputs(rows: int = 7, k: int = 300, seed: int = 0, dtype: str = "float32"):
    """Inputs for the interpreter test: random logits, with a tie and a very peaked row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 4
    x[min(1, rows - 1), :] = 0.0
    x[rows - 1, min(5, k - 1)] = 60.0
    return (x.to(getattr(torch, dtype)),), {"total_bits": 20}
