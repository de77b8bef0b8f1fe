"""Asymmetric low-bit quantization of KV-cache rows, packed into bytes, and its inverse.

``kv_quantize(x[R, D], bits, group, axis)`` returns ``(codes, scale, low)``:

* ``axis="token"`` (values, per token): each row is split into groups of
  ``group`` channels; ``scale`` and ``low`` are ``[R, D // group]``;
* ``axis="channel"`` (keys, per channel): runs of ``group`` consecutive rows
  share one statistic per channel; ``R`` must be a multiple of ``group`` and
  ``scale``/``low`` are ``[R // group, D]``.

A group's ``low`` is its minimum and ``scale = (max - min) / (2**bits - 1)``,
both stored as float16; codes are ``floor((x - low) / scale + 1/2)`` clamped to
``[0, 2**bits)``, computed from the float16-rounded statistics so that
dequantization (``code * scale + low``) sees what the encoder saw. A constant
group gets scale 1 (its codes are all 0). ``codes`` is ``uint8[R, D * bits // 8]``:
code ``d`` of a row sits in byte ``d * bits // 8`` at bit ``d * bits % 8``.

The Triton kernel computes the same float32 operations in the same order, so
both paths give identical codes; tests check that under the interpreter.
"""

from __future__ import annotations

import torch

from toolkit.kernels.backend import dispatch

__all__ = ["kv_dequantize", "kv_quantize", "kv_quantize_reference", "kv_quantize_triton",
           "pack_codes", "unpack_codes"]

BITS = (2, 4, 8)
AXES = ("token", "channel")


def _check(x: torch.Tensor, bits: int, group: int, axis: str) -> None:
    if bits not in BITS:
        raise ValueError(f"KV-cache bits must be one of {BITS}, got {bits}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if x.ndim != 2:
        raise ValueError(f"kv_quantize wants x[R, D], got shape {tuple(x.shape)}")
    r, d = x.shape
    if d % (8 // bits):
        raise ValueError(f"D={d} is not a whole number of bytes at {bits} bits")
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    if axis == "token" and d % group:
        raise ValueError(f"D={d} is not a multiple of the per-token group {group}")
    if axis == "channel" and r % group:
        raise ValueError(f"R={r} rows is not a multiple of the per-channel group {group}")


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8`` codes ``[R, D]`` (each below ``2**bits``) to bytes ``[R, D * bits // 8]``."""
    per = 8 // bits
    r, d = q.shape
    q = q.to(torch.uint8).reshape(r, d // per, per)
    out = torch.zeros(r, d // per, dtype=torch.uint8, device=q.device)
    for j in range(per):
        out |= q[..., j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8[R, D]``."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


def _stats(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    low = lo.to(torch.float16)
    scale = ((hi - lo) / ((1 << bits) - 1)).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, low


def kv_quantize_reference(x: torch.Tensor, bits: int, group: int, axis: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference: ``(codes uint8[R, D*bits/8], scale fp16, low fp16)``."""
    _check(x, bits, group, axis)
    r, d = x.shape
    xf = x.to(torch.float32)
    qmax = (1 << bits) - 1
    if axis == "token":
        g = xf.reshape(r, d // group, group)
        scale, low = _stats(g.amin(-1), g.amax(-1), bits)
        q = torch.floor((g - low.float()[..., None]) / scale.float()[..., None] + 0.5)
    else:
        g = xf.reshape(r // group, group, d)
        scale, low = _stats(g.amin(1), g.amax(1), bits)
        q = torch.floor((g - low.float()[:, None, :]) / scale.float()[:, None, :] + 0.5)
    q = q.clamp(0, qmax).reshape(r, d).to(torch.uint8)
    return pack_codes(q, bits), scale, low


def kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int,
                  group: int, axis: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code * scale + low`` in float32, as ``dtype``: the inverse both paths share."""
    q = unpack_codes(codes, bits).to(torch.float32)
    r, d = q.shape
    if axis == "token":
        x = q.reshape(r, d // group, group) * scale.float()[..., None] + low.float()[..., None]
    elif axis == "channel":
        x = q.reshape(r // group, group, d) * scale.float()[:, None, :] + low.float()[:, None, :]
    else:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return x.reshape(r, d).to(dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _kv_quant_kernel(
        x_ptr, c_ptr, s_ptr, l_ptr, R, sxr, sxd,
        D: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, PER_TOKEN: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # One program quantizes ROWS rows: a block of tokens (per-token groups)
        # or exactly one run of GROUP rows (per-channel groups).
        pid = tl.program_id(0)
        PER: tl.constexpr = 8 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        rr = pid * ROWS + tl.arange(0, ROWS)
        rd = tl.arange(0, D)
        mr = rr < R
        x = tl.load(x_ptr + rr[:, None] * sxr + rd[None, :] * sxd, mask=mr[:, None], other=0.0).to(tl.float32)
        if PER_TOKEN:
            NG: tl.constexpr = D // GROUP
            xg = tl.reshape(x, (ROWS, NG, GROUP))
            lo = tl.min(xg, axis=2)
            hi = tl.max(xg, axis=2)
            low = lo.to(tl.float16)
            scale = ((hi - lo) / QMAX).to(tl.float16)
            scale = tl.where(scale > 0, scale, 1.0)
            q = tl.floor((xg - low.to(tl.float32)[:, :, None]) / scale.to(tl.float32)[:, :, None] + 0.5)
            q = tl.reshape(q, (ROWS, D))
            rg = tl.arange(0, NG)
            sp = rr[:, None] * NG + rg[None, :]
            tl.store(s_ptr + sp, scale, mask=mr[:, None])
            tl.store(l_ptr + sp, low, mask=mr[:, None])
        else:
            lo = tl.min(x, axis=0)
            hi = tl.max(x, axis=0)
            low = lo.to(tl.float16)
            scale = ((hi - lo) / QMAX).to(tl.float16)
            scale = tl.where(scale > 0, scale, 1.0)
            q = tl.floor((x - low.to(tl.float32)[None, :]) / scale.to(tl.float32)[None, :] + 0.5)
            tl.store(s_ptr + pid * D + rd, scale)
            tl.store(l_ptr + pid * D + rd, low)
        q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
        shifts = (tl.arange(0, PER) * BITS)[None, None, :]
        qb = tl.reshape(q, (ROWS, D // PER, PER)) << shifts
        packed = tl.sum(qb, axis=2).to(tl.uint8)
        rb = tl.arange(0, D // PER)
        tl.store(c_ptr + rr[:, None] * (D // PER) + rb[None, :], packed, mask=mr[:, None])


def kv_quantize_triton(x: torch.Tensor, bits: int, group: int, axis: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel; same contract as :func:`kv_quantize_reference` (``D`` and ``group`` powers of 2)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(x, bits, group, axis)
    r, d = x.shape
    if d & (d - 1) or group & (group - 1):
        raise ValueError("the Triton path needs D and group to be powers of 2")
    codes = torch.empty(r, d * bits // 8, dtype=torch.uint8, device=x.device)
    per_token = axis == "token"
    shape = (r, d // group) if per_token else (r // group, d)
    scale = torch.empty(shape, dtype=torch.float16, device=x.device)
    low = torch.empty(shape, dtype=torch.float16, device=x.device)
    if r == 0:
        return codes, scale, low
    rows = 16 if per_token else group
    _kv_quant_kernel[(triton.cdiv(r, rows),)](
        x, codes, scale, low, r, x.stride(0), x.stride(1),
        D=d, GROUP=group, BITS=bits, PER_TOKEN=per_token, ROWS=rows,
    )
    return codes, scale, low


def kv_quantize(x: torch.Tensor, bits: int, group: int, axis: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x[R, D]``: Triton on CUDA, the torch reference elsewhere."""
    d = x.shape[-1] if x.ndim == 2 else 0
    pow2 = d > 0 and not d & (d - 1) and not group & (group - 1)
    if x.is_cuda and pow2:
        return dispatch(kv_quantize_reference, kv_quantize_triton, x, bits, group, axis)
    return kv_quantize_reference(x, bits, group, axis)


def _example_inputs(bits: int = 2, axis: str = "token", rows: int = 40, d: int = 64, group: int = 32,
                    seed: int = 0) -> tuple[tuple, dict]:
    """Input factory for :func:`toolkit.kernels.testing.check_kernel`: outlier channels like real keys."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen)
    x[:, 3] *= 12.0  # an outlier channel, as keys have
    x[5] = 0.25  # a constant row: scale falls back to 1
    return (x, bits, group, axis), {}


def _example_cases(*specs: list) -> tuple[tuple, dict]:
    """Several :func:`_example_inputs` cases at once, so one interpreter subprocess checks them all."""
    return ([_example_inputs(*spec) for spec in specs],), {}


def _cases_triton(cases: list) -> tuple[torch.Tensor, ...]:
    return tuple(t for args, kwargs in cases for t in kv_quantize_triton(*args, **kwargs))


def _cases_reference(cases: list) -> tuple[torch.Tensor, ...]:
    return tuple(t for args, kwargs in cases for t in kv_quantize_reference(*args, **kwargs))
