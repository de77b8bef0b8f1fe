"""Sum layer of a probabilistic circuit in log space.

``out[b, g, o] = log sum_i exp(logw[g, o, i] + x[b, g, i])``: group ``g`` of
sum units mixes the ``I`` children of that group with its own weights. The
reference shifts each row of ``x`` by its maximum, takes ``exp`` and does one
batched matmul with ``exp(logw)`` (the usual trick: a matmul instead of a
``[B, G, O, I]`` broadcast), then returns to log space. The Triton kernel does
the same per tile, in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from toolkit.kernels.backend import dispatch

__all__ = ["sum_layer", "sum_layer_reference", "sum_layer_triton", "example_inputs"]


def _check(x: torch.Tensor, logw: torch.Tensor) -> None:
    if x.ndim != 3 or logw.ndim != 3:
        raise ValueError("sum_layer wants x[B, G, I] and logw[G, O, I]")
    if x.shape[1] != logw.shape[0] or x.shape[2] != logw.shape[2]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs logw {tuple(logw.shape)}")


def sum_layer_reference(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Torch reference: ``[B, G, I]`` log-values, ``[G, O, I]`` log-weights -> fp32 ``[B, G, O]``."""
    _check(x, logw)
    xf = x.to(torch.float32)
    # Detached shift: the function of x is unchanged, and gradients (the EM
    # flows) then pass only through exp/matmul/log, which is exact.
    mx = xf.detach().amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(xf - mx).transpose(0, 1)  # [G, B, I]
    w = torch.exp(logw.to(torch.float32)).transpose(1, 2)  # [G, I, O]
    return torch.log(torch.bmm(e, w)).transpose(0, 1) + mx


_kernel = None
# One fixed tiling, no autotuning: the tile shape decides the order of the
# float reduction, and a coder's encoder and decoder (separate processes)
# must not pick different tilings by timing noise.
_BLOCK_B = 32
_BLOCK_O = 16


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        x_ptr, w_ptr, out_ptr, n_b, n_o, n_i,
        sxb, sxg, sxi, swg, swo, swi, sob, sog, soo,
        BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
        USE_DOT: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        g = tl.program_id(1)
        pid_o = tl.program_id(2)
        rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        ri = tl.arange(0, BLOCK_I)
        mb = rb < n_b
        mo = ro < n_o
        mi = ri < n_i
        xs = tl.load(
            x_ptr + rb[:, None] * sxb + g * sxg + ri[None, :] * sxi,
            mask=mb[:, None] & mi[None, :], other=float("-inf"),
        ).to(tl.float32)
        mx = tl.max(xs, axis=1)
        # A row of -inf (impossible evidence) stays -inf instead of becoming NaN.
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(xs - mx[:, None])
        lw = tl.load(
            w_ptr + g * swg + ro[:, None] * swo + ri[None, :] * swi,
            mask=mo[:, None] & mi[None, :], other=float("-inf"),
        ).to(tl.float32)
        w = tl.exp(lw)
        if USE_DOT:
            # IEEE fp32, not TF32: the sums feed log-likelihoods and code tables.
            acc = tl.dot(e, tl.trans(w), input_precision="ieee")
        else:
            # tl.dot needs every tile side >= 16; few latents use a
            # broadcast-and-reduce instead.
            acc = tl.sum(e[:, None, :] * w[None, :, :], axis=2)
        res = tl.log(acc) + mx[:, None]
        tl.store(
            out_ptr + rb[:, None] * sob + g * sog + ro[None, :] * soo,
            res, mask=mb[:, None] & mo[None, :],
        )

    return kernel


def sum_layer_triton(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Triton kernel; same contract as :func:`sum_layer_reference` (no autograd)."""
    import triton

    global _kernel
    _check(x, logw)
    if _kernel is None:
        _kernel = _build_kernel()
    b, g, i = x.shape
    o = logw.shape[1]
    out = torch.empty((b, g, o), device=x.device, dtype=torch.float32)
    block_i = max(triton.next_power_of_2(i), 2)
    grid = (triton.cdiv(b, _BLOCK_B), g, triton.cdiv(o, _BLOCK_O))
    _kernel[grid](
        x, logw, out, b, o, i,
        *x.stride(), *logw.stride(), *out.stride(),
        BLOCK_B=_BLOCK_B, BLOCK_O=_BLOCK_O, BLOCK_I=block_i, USE_DOT=block_i >= 16,
    )
    return out


def sum_layer(x: torch.Tensor, logw: torch.Tensor) -> torch.Tensor:
    """Log-space sum layer; Triton on CUDA, the torch reference elsewhere.

    Autograd (used by EM to get expected flows) needs the reference, so the
    kernel is taken only when no gradient is required.
    """
    if torch.is_grad_enabled() and (x.requires_grad or logw.requires_grad):
        return sum_layer_reference(x, logw)
    return dispatch(sum_layer_reference, sum_layer_triton, x, logw)


def example_inputs(
    b: int = 37, g: int = 3, o: int = 20, i: int = 12, dtype: str = "float32"
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """Input factory for :func:`toolkit.kernels.testing.check_kernel`."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(b, g, i, generator=gen) * 3 - 5).to(getattr(torch, dtype))
    logw = torch.log_softmax(torch.randn(g, o, i, generator=gen), dim=-1)
    return (x, logw), {}
