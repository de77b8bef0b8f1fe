"""Fixed-point arithmetic for the integer engine: rounding shifts, integer square roots, exact tables.

Everything here is integer arithmetic on numpy ``int64`` arrays, or tables
built with Python integers and :mod:`decimal` (whose ``exp`` and ``ln`` are
correctly rounded in software), so every machine builds the same tables and
computes the same numbers: nothing depends on the C library's ``exp``,
``sin`` or on SIMD width.
"""

from __future__ import annotations

import decimal
from functools import cache

import numpy as np

__all__ = ["rshr", "div_round", "isqrt", "exp_table", "sigmoid_table", "rope_table"]

#: fractional bits of the tables' internal fixed point (Python integers: no overflow)
_ONE_BITS = 96


def rshr(x: np.ndarray, n: int) -> np.ndarray:
    """``round(x / 2**n)``, halves rounded up (an arithmetic shift: exact on negative numbers too)."""
    return (x + (1 << (n - 1))) >> n if n > 0 else x


def div_round(x: np.ndarray, d: np.ndarray | int) -> np.ndarray:
    """``round(x / d)`` for positive ``d``, halves rounded up (floor division of ``2x + d`` by ``2d``)."""
    return (2 * x + d) // (2 * d)


def isqrt(n: np.ndarray) -> np.ndarray:
    """``floor(sqrt(n))`` of non-negative int64 values, exactly.

    A float64 square root (IEEE: correctly rounded) gives a guess within one
    of the answer for values below 2**62; two integer corrections make it exact.
    """
    y = np.sqrt(n.astype(np.float64)).astype(np.int64)
    y -= (y * y > n).astype(np.int64)
    y += ((y + 1) * (y + 1) <= n).astype(np.int64)
    return y


def _dec(prec: int = 40) -> decimal.Context:
    return decimal.Context(prec=prec, rounding=decimal.ROUND_HALF_EVEN)


def _fixed(x: decimal.Decimal, ctx: decimal.Context) -> int:
    """``x`` in Q96, rounded to the nearest integer."""
    return int(ctx.multiply(x, decimal.Decimal(1 << _ONE_BITS)).to_integral_value(decimal.ROUND_HALF_EVEN))


@cache
def _exp_q96(steps_per_nat: int, nats: int) -> tuple[int, ...]:
    """``exp(-i / steps_per_nat)`` in Q96 for ``i`` in ``0 .. nats * steps_per_nat - 1``.

    Repeated multiplication by ``exp(-1 / steps_per_nat)`` in 96-bit fixed
    point: the error after 30,000 steps stays below 2**-80.
    """
    ctx = _dec()
    r = _fixed(ctx.exp(ctx.divide(decimal.Decimal(-1), steps_per_nat)), ctx)
    v, out = 1 << _ONE_BITS, []
    for _ in range(nats * steps_per_nat):
        out.append(v)
        v = (v * r) >> _ONE_BITS
    return tuple(out)


@cache
def exp_table(steps_per_nat: int, nats: int, bits: int) -> np.ndarray:
    """``round(2**bits * exp(-i / steps_per_nat))`` for ``i`` in ``0 .. nats * steps_per_nat``; the last entry 0."""
    shift = _ONE_BITS - bits
    vals = [(v + (1 << (shift - 1))) >> shift for v in _exp_q96(steps_per_nat, nats)]
    return np.array([*vals, 0], dtype=np.int64)


@cache
def sigmoid_table(steps: int, span: int, bits: int) -> np.ndarray:
    """``round(2**bits * sigmoid(x))`` at ``x = i / steps - span`` for ``i`` in ``0 .. 2 * span * steps``."""
    e = _exp_q96(steps, span)
    one, n = 1 << _ONE_BITS, span * steps
    out = np.zeros(2 * n + 1, dtype=np.int64)
    for i in range(2 * n + 1):
        k = abs(i - n)
        ek = e[k] if k < n else 0
        neg = ((ek << (bits + 1)) // (one + ek) + 1) >> 1  # sigmoid(-|x|) = e / (1 + e), rounded
        out[i] = neg if i < n else (1 << bits) - neg
    return out


def _cos_sin(angle: decimal.Decimal, ctx: decimal.Context) -> tuple[decimal.Decimal, decimal.Decimal]:
    """Taylor series of cos and sin for ``|angle| <= 1``, to the context's precision."""
    c, s = decimal.Decimal(0), decimal.Decimal(0)
    term = decimal.Decimal(1)
    for k in range(60):
        if k % 2 == 0:
            c = ctx.add(c, term if k % 4 == 0 else -term)
        else:
            s = ctx.add(s, term if k % 4 == 1 else -term)
        term = ctx.divide(ctx.multiply(term, angle), k + 1)
        if abs(term) < decimal.Decimal(10) ** -(ctx.prec + 2):
            break
    return c, s


@cache
def _base_rotations(theta: float, dim: int) -> tuple[tuple[int, int], ...]:
    """cos and sin of each RoPE frequency ``theta ** (-2i / dim)`` (radians per position), in Q96."""
    ctx = _dec(50)
    log_theta = ctx.ln(decimal.Decimal(repr(theta)))
    out = []
    for i in range(dim // 2):
        w = ctx.exp(ctx.multiply(log_theta, ctx.divide(decimal.Decimal(-2 * i), dim)))
        c, s = _cos_sin(w, ctx)
        out.append((_fixed(c, ctx), _fixed(s, ctx)))
    return tuple(out)


def _power(rot: tuple[int, int], p: int) -> tuple[int, int]:
    """``(cos, sin)`` of ``p`` times the rotation ``rot`` (binary powering of a unit complex number, Q96)."""
    one = 1 << _ONE_BITS
    c, s = one, 0
    bc, bs = rot
    while p:
        if p & 1:
            c, s = (c * bc - s * bs) >> _ONE_BITS, (s * bc + c * bs) >> _ONE_BITS
        bc, bs = (bc * bc - bs * bs) >> _ONE_BITS, (2 * bc * bs) >> _ONE_BITS
        p >>= 1
    return c, s


def rope_table(theta: float, dim: int, positions: range, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """RoPE cos and sin ``[len(positions), dim]`` (halves repeated, as Llama lays them out) in Q``bits``."""
    rots = _base_rotations(theta, dim)
    cos = np.zeros((len(positions), dim // 2), dtype=np.int64)
    sin = np.zeros_like(cos)
    shift = _ONE_BITS - bits
    half = 1 << (shift - 1)
    for j, rot in enumerate(rots):
        c, s = _power(rot, positions.start)
        step_c, step_s = _power(rot, positions.step)
        for i in range(len(positions)):
            cos[i, j], sin[i, j] = (c + half) >> shift, (s + half) >> shift
            c, s = (c * step_c - s * step_s) >> _ONE_BITS, (s * step_c + c * step_s) >> _ONE_BITS
    return np.concatenate([cos, cos], axis=1), np.concatenate([sin, sin], axis=1)
