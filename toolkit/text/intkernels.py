"""Compiled loops of the integer engine (numba): each fuses what would be many numpy passes.

Every function computes on integers only (int8 inputs, int64 accumulators,
rounding shifts), so the compiler, SIMD width and thread that runs it do
not change a single result. They release the GIL, so the engine's threads
run them on separate row ranges at once. The arithmetic is spelled out in
:mod:`toolkit.text.integer`, whose docstring gives the number formats;
bounds that keep int64 from overflowing are noted where they are tight.

numba rather than numpy: a step of a small batch runs a few hundred tiny
array operations, and numpy's per-call cost made it four times slower.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: fractional bits of activations (Q16)
FRAC = 16
#: fractional bits of the per-row weight multipliers
COL_BITS = 34
#: rows of a linear layer below which the int8 loop beats float32 BLAS (which reads 4 bytes a weight)
SMALL_ROWS = 8


@njit(nogil=True, cache=True, inline="always")
def _rshr(x, n):  # noqa: ANN001, ANN202 - numba infers the integer types
    return (x + (1 << (n - 1))) >> n


@njit(nogil=True, cache=True, inline="always")
def _isqrt(n):  # noqa: ANN001, ANN202
    """floor(sqrt(n)) for 0 <= n < 2**62: a float64 guess (IEEE: correctly rounded) made exact by two corrections."""
    y = np.int64(np.sqrt(np.float64(n)))
    if y * y > n:
        y -= 1
    if (y + 1) * (y + 1) <= n:
        y += 1
    return y


@njit(nogil=True, cache=True, inline="always")
def _quant_into(v, mx, out):  # noqa: ANN001, ANN202
    """``out[c] = round(v[c] * 127 / mx)`` with ``mx >= max |v|``: ``v * (127 * 2**55 // mx)`` stays below 2**62."""
    recip = (np.int64(127) << 55) // mx
    for c in range(v.shape[0]):
        out[c] = _rshr(v[c] * recip, 55)


@njit(nogil=True, cache=True, inline="always")
def _rope_into(x, cos, sin, lim, out):  # noqa: ANN001, ANN202
    """``out`` = ``x`` rotated (Q14 ``cos``, ``sin`` rows; Llama's halves), clamped to +-``lim``; returns max |out|."""
    half = x.shape[0] // 2
    mx = np.int64(1)
    for c in range(x.shape[0]):
        rot = -x[c + half] if c < half else x[c - half]
        v = min(max(_rshr(x[c] * cos[c] + rot * sin[c], 14), -lim), lim)
        out[c] = v
        mx = max(mx, abs(v))
    return mx


@njit(nogil=True, cache=True)
def quant_rows(x, q, m):  # noqa: ANN001, ANN201
    """``q[i] = round(x[i] * 127 / m[i])`` (int8) with ``m[i] = max |x[i]|`` (at least 1), rows of a 2-D ``x``."""
    for i in range(x.shape[0]):
        mx = np.int64(1)
        for c in range(x.shape[1]):
            mx = max(mx, abs(x[i, c]))
        _quant_into(x[i], mx, q[i])
        m[i] = mx


@njit(nogil=True, cache=True)
def norm_quant(x, eps, q, r):  # noqa: ANN001, ANN201
    """RMSNorm without its gain (folded into the next weights) as int8 rows ``q`` and their scales ``r`` (Q16).

    Row ``i`` stands for ``q[i] * r[i] / (127 * 2**16)``: ``r = max|x| / rms(x)``.
    """
    k = x.shape[1]
    for i in range(x.shape[0]):
        mx = np.int64(1)
        ss = np.int64(0)
        for c in range(k):
            v = x[i, c]
            mx = max(mx, abs(v))
            ss += v * v  # |x| <= 2**26: each square below 2**52, a row of up to 2**10 below 2**62
        _quant_into(x[i], mx, q[i])
        rms = max(_isqrt(ss // k + eps), 1)
        r[i] = (mx << FRAC) // rms


@njit(nogil=True, cache=True)
def linear_small(q, r, w, m, out):  # noqa: ANN001, ANN201
    """``out = requant(q @ w.T)`` for int8 rows ``q`` and int8 weights ``w`` ``[O, K]``: few rows, int8 loads."""
    for i in range(q.shape[0]):
        for o in range(w.shape[0]):
            acc = np.int32(0)
            for c in range(q.shape[1]):
                acc += np.int32(q[i, c]) * np.int32(w[o, c])  # |acc| <= 127**2 * K < 2**24
            out[i, o] = _rshr(_rshr(np.int64(acc) * m[o], COL_BITS - 14) * r[i], 14)


@njit(nogil=True, cache=True)
def requant(acc, r, m, out):  # noqa: ANN001, ANN201
    """``out = requant(acc)`` for a float32 product of int8 values (integers below 2**24, exact)."""
    for i in range(acc.shape[0]):
        for o in range(acc.shape[1]):
            out[i, o] = _rshr(_rshr(np.int64(acc[i, o]) * m[o], COL_BITS - 14) * r[i], 14)


@njit(nogil=True, cache=True)
def add_clamp(x, y, lim):  # noqa: ANN001, ANN201
    """``x += y``, clamped to ``+-lim``, in place."""
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[i, c] = min(max(x[i, c] + y[i, c], -lim), lim)


@njit(nogil=True, cache=True)
def silu_mul_quant(gu, inter, sig, q, r):  # noqa: ANN001, ANN201
    """``silu(g) * u`` of ``gu = [g | u]`` (Q16, clamped to +-2**24), as int8 rows and Q16 scales.

    The sigmoid comes from a table of 1/64 steps over [-16, 16] in Q15,
    interpolated linearly; the product is Q32 (below 2**48).
    """
    lim = np.int64(1) << (FRAC + 8)
    sub = FRAC - 6
    lo = 16 * 64
    mask = (np.int64(1) << sub) - 1
    h = np.empty(inter, dtype=np.int64)
    for i in range(gu.shape[0]):
        mx = np.int64(1)
        for c in range(inter):
            g = min(max(gu[i, c], -lim), lim)
            u = min(max(gu[i, inter + c], -lim), lim)
            gi = g >> sub
            if gi < -lo:
                s = sig[0]
            elif gi >= lo:
                s = sig[2 * lo]
            else:
                s0 = sig[gi + lo]
                s = s0 + _rshr((sig[gi + lo + 1] - s0) * (g & mask), sub)
            v = _rshr(g * s, 15) * u
            h[c] = v
            mx = max(mx, abs(v))
        _quant_into(h, mx, q[i])
        r[i] = max(_rshr(mx, FRAC), 1)


@njit(nogil=True, cache=True)
def attend(qkv, heads, kv, d, k8, rk, v8, rv, cos, sin, pos0, ring_slot, n_keys, att_exp, score_scale, out):  # noqa: ANN001, ANN201, E501
    """One attention block for new tokens ``qkv`` ``[S, L, (heads + 2 kv) d]`` (Q16); output ``[S, L, heads d]``.

    Rotary embedding (``cos``, ``sin``: Q14 rows of the new positions), int8
    keys and values with one scale per head and token written to the cache at
    ``ring_slot`` (a ring buffer) or ``pos0 + l``; scores ``q.k / sqrt(d)`` in
    Q16 nats; softmax weights from the Q15 table ``att_exp`` (1/256 nat
    steps); the weighted mean of the values. With several new tokens (a
    restart at position 0) query ``l`` sees keys ``0..l``; otherwise the
    first ``n_keys`` slots.
    """
    s_n, l_n = qkv.shape[0], qkv.shape[1]
    group = heads // kv
    qk_lim = np.int64(1) << (FRAC + 8)
    v_lim = np.int64(1) << (FRAC + 10)
    top = att_exp.shape[0] - 1
    tmp = np.empty(d, dtype=np.int64)
    q8 = np.empty(d, dtype=np.int32)
    z = np.empty(k8.shape[2], dtype=np.int64)
    acc = np.empty(d, dtype=np.int64)
    for s in range(s_n):
        for ll in range(l_n):
            slot = ring_slot if ring_slot >= 0 else pos0 + ll
            for g in range(kv):
                bk = (heads + g) * d
                mk = _rope_into(qkv[s, ll, bk : bk + d], cos[ll], sin[ll], qk_lim, tmp)
                _quant_into(tmp, mk, k8[s, g, slot])
                rk[s, g, slot] = mk
                bv = (heads + kv + g) * d
                mv = np.int64(1)
                for c in range(d):
                    v = min(max(qkv[s, ll, bv + c], -v_lim), v_lim)
                    tmp[c] = v
                    mv = max(mv, abs(v))
                _quant_into(tmp, mv, v8[s, g, slot])
                rv[s, g, slot] = mv
        for ll in range(l_n):
            nk = ll + 1 if l_n > 1 else n_keys
            for hh in range(heads):
                g = hh // group
                bq = hh * d
                mq = _rope_into(qkv[s, ll, bq : bq + d], cos[ll], sin[ll], qk_lim, tmp)
                _quant_into(tmp, mq, q8)
                zmax = np.iinfo(np.int64).min
                for j in range(nk):
                    dot = np.int32(0)
                    for c in range(d):
                        dot += q8[c] * np.int32(k8[s, g, j, c])  # below 2**20: int32 lanes
                    # dot * rk < 2**44, then * rq < 2**58, then the score scale (below 2**21): Q16 nats
                    zj = _rshr(_rshr(_rshr(np.int64(dot) * rk[s, g, j], 10) * mq, 20) * score_scale, 24)
                    z[j] = zj
                    zmax = max(zmax, zj)
                for c in range(d):
                    acc[c] = 0
                sum_e = np.int64(0)
                for j in range(nk):
                    gap = _rshr(zmax - z[j], FRAC - 8)
                    e = att_exp[min(gap, top)]
                    if e == 0:
                        continue
                    sum_e += e
                    w = _rshr(e * rv[s, g, j], 14)  # below 2**27; * 127 over 4096 keys below 2**46
                    for c in range(d):
                        acc[c] += w * v8[s, g, j, c]
                den = 127 * sum_e
                for c in range(d):
                    # (acc << 14) below 2**60: the window is at most 4096 keys
                    out[s, ll, bq + c] = (2 * (acc[c] << 14) + den) // (2 * den)


@njit(nogil=True, cache=True)
def probs_q30(logits, exp30, out):  # noqa: ANN001, ANN201
    """``2**30 * exp(l - max)`` of Q16 logits from a 1/1024-nat table (0 beyond its end)."""
    top = exp30.shape[0] - 1
    for i in range(logits.shape[0]):
        mx = logits[i, 0]
        for c in range(logits.shape[1]):
            mx = max(mx, logits[i, c])
        for c in range(logits.shape[1]):
            out[i, c] = exp30[min(_rshr(mx - logits[i, c], FRAC - 10), top)]


@njit(nogil=True, cache=True)
def quant_head(w, q, m, head_frac, col_bits):  # noqa: ANN001, ANN201
    """int8 rows of the master head ``w`` (Q``head_frac`` integers in float64) and their multipliers."""
    for i in range(w.shape[0]):
        mx = np.int64(1)
        for c in range(w.shape[1]):
            mx = max(mx, abs(np.int64(w[i, c])))
        recip = (np.int64(127) << 32) // mx
        for c in range(w.shape[1]):
            q[i, c] = _rshr(np.int64(w[i, c]) * recip, 32)
        m[i] = (mx << (col_bits - head_frac)) // (127 * 127)


@njit(nogil=True, cache=True)
def update_head(w, grad, first, rate, lr, q, m, wt, head_frac, col_bits):  # noqa: ANN001, ANN201
    """One SGD step on rows ``first ..`` of the master head ``w`` (Q``head_frac`` integers in float64), and their
    int8 copy: ``q`` (rows), ``wt`` (float32 columns, for BLAS) and the multipliers ``m``.

    ``grad`` (float64 integers) is ``G^T X`` for these rows: the Q16 softmax gradient times the int8 inputs
    times their scales. The step is ``rshr(rshr(rshr(grad, 16) * rate, 16) * lr, 28)`` with ``rate`` per
    column (Q16) and ``lr`` the rate per token over 127 (Q36).
    """
    k = w.shape[1]
    for i in range(grad.shape[0]):
        row = first + i
        mx = np.int64(1)
        for c in range(k):
            g = _rshr(_rshr(np.int64(grad[i, c]), 16) * rate[c], 16)
            v = np.int64(w[row, c]) - _rshr(g * lr, 28)
            w[row, c] = v
            mx = max(mx, abs(v))
        recip = (np.int64(127) << 32) // mx
        for c in range(k):
            qv = _rshr(np.int64(w[row, c]) * recip, 32)
            q[row, c] = qv
            wt[c, row] = qv
        m[row] = (mx << (col_bits - head_frac)) // (127 * 127)
