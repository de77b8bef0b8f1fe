"""The Vocos-style decoder (``decoder="istft"``): predicted short-time spectra, inverted by an inverse FFT.

It follows Vocos (Siuzdak 2023): the network works at the frame rate and
predicts spectra, which trains several times faster on a CPU than generating
samples through transposed convolutions. Vocos itself decodes EnCodec's codes
that way; here one is trained on this project's frozen encoder and codebooks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from toolkit.audio.config import AudioNetConfig
from toolkit.audio.streaming import CausalConv1d, StreamingState

__all__ = ["ConvNeXtBlock", "ISTFTDecoder"]


class ConvNeXtBlock(nn.Module):
    """Vocos's backbone block made causal: a depthwise kernel-7 convolution over this and past frames,
    LayerNorm, a 3x-wide GELU MLP and a per-channel scale, added to the input."""

    def __init__(self, ch: int, layer_scale: float):
        super().__init__()
        self.dw = CausalConv1d(ch, ch, 7, groups=ch)
        self.norm = nn.LayerNorm(ch)
        self.up, self.down = nn.Linear(ch, 3 * ch), nn.Linear(3 * ch, ch)
        self.scale = nn.Parameter(torch.full((ch,), layer_scale))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.norm(h.transpose(1, 2)))))
        return (self.scale * h).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._mlp(self.dw(x))

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        return x + self._mlp(self.dw.step(x, state))


class ISTFTDecoder(nn.Module):
    """Latent frames to samples through predicted spectra (Vocos; Siuzdak 2023), made causal.

    Each latent frame becomes ``decoder_upsample`` spectra (one 1x1 convolution,
    interleaved); causal ConvNeXt blocks refine them; a linear head gives each
    spectrum's log magnitude and phase. An inverse real FFT, a Hann window and
    overlap-add at ``stft_hop`` make the waveform. The network works at the
    frame rate, not the sample rate, so it costs a fraction of a transposed-
    convolution decoder, and a spectrum is an easier target than raw samples.

    Causality: a spectrum's window ends at or before the end of its latent
    frame's input, so it never depicts audio the encoder has not heard. A sample is whole
    once the 3 spectra after it are added, so the output lags its codes by 3
    hops (:attr:`AudioNetConfig.decoder_lag`), and a stream's end is padded with
    silence to complete the last samples (:meth:`AudioNetConfig.frames_for`). Offline,
    the output is the overlap-add shifted left by those 3 hops; streaming
    carries the incomplete tail from block to block and drops the first 3
    hops, which gives the same samples.
    """

    def __init__(self, cfg: AudioNetConfig):
        super().__init__()
        ch, self.up_factor = cfg.decoder_channels, cfg.decoder_upsample
        self.hop, self.n_fft = cfg.stft_hop, 4 * cfg.stft_hop
        self.conv_in = CausalConv1d(cfg.dim, ch, 7)
        self.upsample = nn.Conv1d(ch, ch * self.up_factor, 1)
        self.blocks = nn.ModuleList(ConvNeXtBlock(ch, 1.0 / cfg.decoder_layers) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(ch)
        self.head = nn.Linear(ch, 2 * (self.n_fft // 2 + 1))
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def _interleave(self, h: torch.Tensor) -> torch.Tensor:
        b, _, t = h.shape
        h = self.upsample(h).view(b, self.up_factor, -1, t)  # [b, j, c, t] -> spectrum t * up + j
        return h.permute(0, 2, 3, 1).reshape(b, -1, t * self.up_factor)

    def _overlap_add(self, h: torch.Tensor) -> torch.Tensor:
        """Spectra features ``[b, ch, n]`` to the overlap-add of their windowed frames, ``(n + 3) * hop`` long."""
        logmag, phase = self.head(self.norm(h.transpose(1, 2))).chunk(2, dim=-1)
        # exp caps at e^4.6 = 100, Vocos's clip: a loud start cannot overflow
        spec = torch.polar(logmag.clamp(max=4.6).exp(), phase)
        frames = torch.fft.irfft(spec, n=self.n_fft) * self.window  # [b, n, n_fft]
        n = frames.shape[1]
        return F.fold(frames.transpose(1, 2), output_size=(1, (n + 3) * self.hop), kernel_size=(1, self.n_fft),
                      stride=(1, self.hop)).view(frames.shape[0], 1, -1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._interleave(self.conv_in(z))
        for block in self.blocks:
            h = block(h)
        return self._overlap_add(h)[..., 3 * self.hop:]

    def step(self, z: torch.Tensor, state: StreamingState) -> torch.Tensor:
        h = self._interleave(self.conv_in.step(z, state))
        for block in self.blocks:
            h = block.step(h, state)
        y = self._overlap_add(h)
        tail = state.get(self)
        if tail is not None:
            y = torch.cat([y[..., : tail.shape[-1]] + tail, y[..., tail.shape[-1]:]], dim=-1)
        n = y.shape[-1] - 3 * self.hop
        state[self] = y[..., n:]
        drop = state.get((self, "drop"), 3 * self.hop)  # the first 3 hops lie before the signal's start
        out = y[..., min(drop, n):n]
        state[(self, "drop")] = max(0, drop - n)
        return out

    def finish(self, state: StreamingState) -> torch.Tensor:
        """The samples still held at the end of a stream (the last 3 hops, as offline decoding gives them)."""
        tail = state.pop(self, None)
        if tail is None:
            return torch.zeros(1, 1, 0)
        return tail[..., state.pop((self, "drop"), 0):]
