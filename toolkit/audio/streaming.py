"""Causal convolutions that stream exactly: each keeps what its kernel needs from one block to the next.

Every layer with a ``step(x, state)`` method continues from what it left in
``state`` (a dict, one per stream, from module to its carried tensor): a
convolution keeps the last inputs its kernel reaches back to, a transposed
one the tail of its output that the next block overlaps. Running the same
blocks through ``step`` is then the same arithmetic on the same shapes,
whoever calls it, so streamed and offline coding agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CausalConv1d", "CausalConvTranspose1d", "Sequential", "StreamingState", "step"]

StreamingState = dict  # module -> its carried tensor, one per stream


class CausalConv1d(nn.Conv1d):
    """A convolution padded on the left by what its kernel reaches back, so output t sees inputs <= t.

    ``step(x, state)`` continues from the inputs kept in ``state`` (zeros at
    the start, which is what the offline left padding is).
    """

    @property
    def context(self) -> int:
        return (self.kernel_size[0] - 1) * self.dilation[0] + 1 - self.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.context, 0)))

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        prev = state.get(self)
        if prev is None:
            prev = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([prev, x], dim=-1)
        state[self] = x[..., x.shape[-1] - self.context:]
        return super().forward(x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """A transposed convolution whose output is cut to ``stride`` samples per input, the overlap carried.

    Offline, the ``kernel - stride`` samples that spill past the end are
    dropped; streaming, they are added to the start of the next block's
    output (overlap-add), with the bias added once per sample.
    """

    @property
    def overlap(self) -> int:
        return self.kernel_size[0] - self.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y[..., : y.shape[-1] - self.overlap]

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.weight, None, self.stride)
        prev = state.get(self)
        if prev is not None:
            y = torch.cat([y[..., : self.overlap] + prev, y[..., self.overlap:]], dim=-1)
        n = y.shape[-1] - self.overlap
        state[self] = y[..., n:]
        return y[..., :n] + self.bias[:, None]


def step(module: nn.Module, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
    """One block through ``module``: its ``step`` where it carries state, its ``forward`` where it has none."""
    return module.step(x, state) if hasattr(module, "step") else module(x)


class Sequential(nn.Sequential):
    """``nn.Sequential`` that also streams, layer by layer."""

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        for m in self:
            x = step(m, x, state)
        return x
