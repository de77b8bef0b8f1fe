"""Attention of decode-step queries over a bit-packed KIVI cache, without unpacking it to memory.

``packed_attention(q[N, Q, D], k_codes[N, T, D*b/8], k_scale[N, T/Gk, D], k_low,
v_codes[N, T, D*b/8], v_scale[N, T, D/Gv], v_low, bits, k_group, v_group, sm_scale)``
returns ``(out[N, Q, D], lse[N, Q])`` in float32: softmax attention of each
query over the ``T`` quantized tokens of its KV head ``n`` (``Q`` queries per
KV head: grouped-query attention), with the log-sum-exp of the scaled scores
so that a caller merges it with attention over a full-precision window
(:func:`merge_attention`). Keys are quantized per channel in runs of ``Gk``
tokens and values per token in groups of ``Gv`` channels, as
:mod:`toolkit.kernels.kv_quant` stores them.

The Triton kernel streams the cache in blocks of tokens, dequantizing each
block in registers and keeping a running maximum and sum (the flash-decoding
recurrence), so the float cache never exists in memory.
"""

from __future__ import annotations

import torch

from toolkit.kernels.backend import dispatch
from toolkit.kernels.kv_quant import kv_dequantize

__all__ = ["merge_attention", "packed_attention", "packed_attention_reference",
           "packed_attention_triton"]


def _check(q, k_codes, k_scale, k_low, v_codes, v_scale, v_low, bits, k_group, v_group) -> None:
    if q.ndim != 3 or k_codes.ndim != 3 or v_codes.ndim != 3:
        raise ValueError("packed_attention wants q[N, Q, D] and codes[N, T, D*bits/8]")
    n, _, d = q.shape
    t = k_codes.shape[1]
    if k_codes.shape != (n, t, d * bits // 8) or v_codes.shape != k_codes.shape:
        raise ValueError(f"codes must be [{n}, T, {d * bits // 8}] for D={d} at {bits} bits")
    if t % k_group or k_scale.shape != (n, t // k_group, d) or k_low.shape != k_scale.shape:
        raise ValueError("key statistics must be [N, T / k_group, D]")
    if d % v_group or v_scale.shape != (n, t, d // v_group) or v_low.shape != v_scale.shape:
        raise ValueError("value statistics must be [N, T, D / v_group]")


def packed_attention_reference(q, k_codes, k_scale, k_low, v_codes, v_scale, v_low,
                               bits: int, k_group: int, v_group: int, sm_scale: float
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: dequantize the cache, then plain float32 softmax attention."""
    _check(q, k_codes, k_scale, k_low, v_codes, v_scale, v_low, bits, k_group, v_group)
    n, nq, d = q.shape
    t = k_codes.shape[1]
    if t == 0:
        return (torch.zeros(n, nq, d, device=q.device),
                torch.full((n, nq), float("-inf"), device=q.device))
    k = kv_dequantize(k_codes.reshape(n * t, -1), k_scale.reshape(-1, d), k_low.reshape(-1, d),
                      bits, k_group, "channel").reshape(n, t, d)
    v = kv_dequantize(v_codes.reshape(n * t, -1), v_scale.reshape(n * t, -1),
                      v_low.reshape(n * t, -1), bits, v_group, "token").reshape(n, t, d)
    s = torch.einsum("nqd,ntd->nqt", q.float(), k) * sm_scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("nqt,ntd->nqd", torch.exp(s - lse[..., None]), v)
    return out, lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two key sets, from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return out_a * wa + out_b * wb


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

# A fixed block of tokens (no autotuning): the order of the float32 sums is
# then the same on every run.
_BLOCK_T = 32

if triton is not None:

    @triton.jit
    def _packed_attention_kernel(
        q_ptr, kc_ptr, ks_ptr, kl_ptr, vc_ptr, vs_ptr, vl_ptr, o_ptr, lse_ptr,
        T, sm_scale,
        NQ: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
        KG: tl.constexpr, VG: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        n = tl.program_id(0)
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER
        MASK: tl.constexpr = (1 << BITS) - 1
        rq = tl.arange(0, BQ)
        rd = tl.arange(0, D)
        mq = rq < NQ
        q = tl.load(q_ptr + n * NQ * D + rq[:, None] * D + rd[None, :], mask=mq[:, None], other=0.0)
        q = q.to(tl.float32) * sm_scale
        m_i = tl.full((BQ,), float("-inf"), tl.float32)
        l_i = tl.zeros((BQ,), tl.float32)
        acc = tl.zeros((BQ, D), tl.float32)
        byte = rd // PER
        shift = (rd % PER) * BITS
        for t0 in range(0, T, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            mt = rt < T
            base = n * T * DB + rt[:, None] * DB + byte[None, :]
            kq = (tl.load(kc_ptr + base, mask=mt[:, None], other=0).to(tl.int32) >> shift[None, :]) & MASK
            kgi = rt // KG
            ks = tl.load(ks_ptr + (n * (T // KG) + kgi[:, None]) * D + rd[None, :], mask=mt[:, None], other=0.0)
            kl = tl.load(kl_ptr + (n * (T // KG) + kgi[:, None]) * D + rd[None, :], mask=mt[:, None], other=0.0)
            k = kq.to(tl.float32) * ks.to(tl.float32) + kl.to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            s = tl.where(mt[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            vq = (tl.load(vc_ptr + base, mask=mt[:, None], other=0).to(tl.int32) >> shift[None, :]) & MASK
            vgi = rd // VG
            vp = (n * T + rt[:, None]) * (D // VG) + vgi[None, :]
            vs = tl.load(vs_ptr + vp, mask=mt[:, None], other=0.0)
            vl = tl.load(vl_ptr + vp, mask=mt[:, None], other=0.0)
            v = vq.to(tl.float32) * vs.to(tl.float32) + vl.to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + n * NQ * D + rq[:, None] * D + rd[None, :], out, mask=mq[:, None])
        tl.store(lse_ptr + n * NQ + rq, m_i + tl.log(l_i), mask=mq)


def packed_attention_triton(q, k_codes, k_scale, k_low, v_codes, v_scale, v_low,
                            bits: int, k_group: int, v_group: int, sm_scale: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel; same contract as :func:`packed_attention_reference` (``D`` a power of 2)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(q, k_codes, k_scale, k_low, v_codes, v_scale, v_low, bits, k_group, v_group)
    n, nq, d = q.shape
    t = k_codes.shape[1]
    if d & (d - 1):
        raise ValueError("the Triton path needs D to be a power of 2")
    out = torch.zeros(n, nq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, nq), float("-inf"), dtype=torch.float32, device=q.device)
    if t == 0 or n == 0:
        return out, lse
    _packed_attention_kernel[(n,)](
        q.contiguous(), k_codes.contiguous(), k_scale.contiguous(), k_low.contiguous(),
        v_codes.contiguous(), v_scale.contiguous(), v_low.contiguous(), out, lse,
        t, float(sm_scale),
        NQ=nq, BQ=max(2, triton.next_power_of_2(nq)), D=d, BITS=bits, KG=k_group, VG=v_group,
        BLOCK_T=_BLOCK_T,
    )
    return out, lse


def packed_attention(q, k_codes, k_scale, k_low, v_codes, v_scale, v_low,
                     bits: int, k_group: int, v_group: int, sm_scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a packed cache: Triton on CUDA, the torch reference elsewhere."""
    return dispatch(packed_attention_reference, packed_attention_triton, q, k_codes, k_scale,
                    k_low, v_codes, v_scale, v_low, bits, k_group, v_group, sm_scale)


def _example_inputs(bits: int = 2, n: int = 3, nq: int = 2, t: int = 70, d: int = 64,
                    k_group: int = 32, v_group: int = 32, seed: int = 0) -> tuple[tuple, dict]:
    """Input factory for the interpreter test: a quantized random cache, ``t`` a multiple of ``k_group``."""
    from toolkit.kernels.kv_quant import kv_quantize_reference

    gen = torch.Generator().manual_seed(seed)
    t = (t // k_group) * k_group
    k = torch.randn(n * t, d, generator=gen)
    k[:, 1] *= 8.0
    v = torch.randn(n * t, d, generator=gen)
    kc, ks, kl = kv_quantize_reference(k, bits, k_group, "channel")
    vc, vs, vl = kv_quantize_reference(v, bits, v_group, "token")
    q = torch.randn(n, nq, d, generator=gen)
    return (q, kc.reshape(n, t, -1), ks.reshape(n, t // k_group, d), kl.reshape(n, t // k_group, d),
            vc.reshape(n, t, -1), vs.reshape(n, t, -1), vl.reshape(n, t, -1),
            bits, k_group, v_group, d ** -0.5), {}


def _example_cases(*specs: list) -> tuple[tuple, dict]:
    """Several :func:`_example_inputs` cases at once, so one interpreter subprocess checks them all."""
    return ([_example_inputs(*spec) for spec in specs],), {}


def _cases_triton(cases: list) -> tuple[torch.Tensor, ...]:
    return tuple(t for args, kwargs in cases for t in packed_attention_triton(*args, **kwargs))


def _cases_reference(cases: list) -> tuple[torch.Tensor, ...]:
    return tuple(t for args, kwargs in cases for t in packed_attention_reference(*args, **kwargs))
