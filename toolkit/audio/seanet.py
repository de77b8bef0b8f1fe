"""SEANet: the causal convolutional encoder, and the decoder that mirrors it with transposed convolutions.

The layout follows SoundStream and EnCodec (Zeghidour et al. 2021, Défossez
et al. 2022): a 1-D convolution, then per downsampling stage residual units
(dilated convolutions with a skip) and a strided convolution that doubles the
channels; the decoder mirrors it with transposed convolutions. Every
convolution is causal (padded on the left only), so a sample's code depends
on the past alone and the network streams (:mod:`toolkit.audio.streaming`).
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.audio.config import AudioNetConfig
from toolkit.audio.streaming import CausalConv1d, CausalConvTranspose1d, Sequential, StreamingState

__all__ = ["ResidualUnit", "encoder", "seanet_decoder"]


class ResidualUnit(nn.Module):
    """ELU, a dilated kernel-3 convolution to half the channels, ELU, a 1x1 back: added to the input."""

    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.block = Sequential(nn.ELU(), CausalConv1d(ch, ch // 2, 3, dilation=dilation), nn.ELU(),
                                CausalConv1d(ch // 2, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        return x + self.block.step(x, state)


def _wn(m: nn.Module) -> nn.Module:
    # weight normalisation, as SEANet's convolutions have; folded away for inference (InferenceCodec)
    return nn.utils.parametrizations.weight_norm(m)


def encoder(cfg: AudioNetConfig) -> Sequential:
    ch = cfg.channels
    layers: list[nn.Module] = [_wn(CausalConv1d(1, ch, 7))]
    for r in cfg.ratios:
        out = min(2 * ch, cfg.max_channels)
        layers += [ResidualUnit(ch, 3 ** i) for i in range(cfg.residual_layers)]
        layers += [nn.ELU(), _wn(CausalConv1d(ch, out, 2 * r, stride=r))]
        ch = out
    layers += [nn.ELU(), _wn(CausalConv1d(ch, cfg.dim, 3))]
    return Sequential(*layers)


def seanet_decoder(cfg: AudioNetConfig) -> Sequential:
    chans = [cfg.channels]
    for _ in cfg.ratios:
        chans.append(min(2 * chans[-1], cfg.max_channels))
    ch = chans[-1]
    layers: list[nn.Module] = [_wn(CausalConv1d(cfg.dim, ch, 7))]
    for r, out in zip(reversed(cfg.ratios), reversed(chans[:-1]), strict=True):
        layers += [nn.ELU(), _wn(CausalConvTranspose1d(ch, out, 2 * r, stride=r))]
        layers += [ResidualUnit(out, 3 ** i) for i in range(cfg.residual_layers)]
        ch = out
    layers += [nn.ELU(), _wn(CausalConv1d(ch, 1, 7))]
    return Sequential(*layers)
