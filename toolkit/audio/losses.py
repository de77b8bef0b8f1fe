"""Training losses of the audio codec: spectral reconstruction, and adversarial with feature matching.

- :class:`MelLoss`: L1 between log mel spectrograms at several window sizes
  (DAC's multi-scale mel loss; Kumar et al. 2023), with torchaudio's mel filters.
- The multi-resolution STFT loss is ``auraloss.freq.MultiResolutionSTFTLoss``
  (spectral convergence plus log magnitude; Yamamoto et al. 2020).
- :class:`MultiPeriodDiscriminator` (HiFi-GAN; Kong et al. 2020): the signal
  folded by periods 2, 3, 5, 7 and 11 and judged by 2-D convolutions, which
  catches periodic (pitch) structure.
- :class:`MultiScaleSTFTDiscriminator` (EnCodec; Défossez et al. 2022):
  2-D convolutions over complex STFTs at several resolutions.
- Hinge adversarial losses and L1 feature matching on every discriminator
  layer, relative to the real features' mean magnitude (as EnCodec does).

No maintained package has these discriminators as reusable modules (they live
inside each codec's training repository), so they are written here, small.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MelLoss", "MultiPeriodDiscriminator", "MultiScaleSTFTDiscriminator", "Discriminators",
           "discriminator_loss", "generator_adv_loss", "feature_matching_loss", "mel_distance", "si_sdr"]


class MelLoss(nn.Module):
    def __init__(self, sample_rate: int = 16000, windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)):
        super().__init__()
        import torchaudio

        self.specs = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=w, win_length=w, hop_length=w // 4,
                                                 n_mels=min(w // 8 + 2, 128),
                                                 power=1.0, center=False)
            for w in windows)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = y.new_zeros(())
        for spec in self.specs:
            a, b = spec(y), spec(x)
            loss = loss + (a.clamp_min(1e-5).log10() - b.clamp_min(1e-5).log10()).abs().mean()
        return loss / len(self.specs)


@torch.no_grad()
def mel_distance(y: torch.Tensor, x: torch.Tensor, sample_rate: int = 16000) -> float:
    """The multi-scale log-mel L1 distance of :class:`MelLoss`: the benchmark's mel distance."""
    return float(MelLoss(sample_rate).to(x.device)(y.reshape(1, 1, -1), x.reshape(1, 1, -1)))


def si_sdr(y: torch.Tensor, x: torch.Tensor, eps: float = 1e-8) -> float:
    """Scale-invariant signal-to-distortion ratio of ``y`` against reference ``x``, in dB."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    x, y = x - x.mean(), y - y.mean()
    target = (y @ x) / (x @ x + eps) * x
    return float(10 * torch.log10((target @ target + eps) / ((y - target) @ (y - target) + eps)))


# --------------------------------------------------------------------------- discriminators
def _wn(m: nn.Module) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(m)


def _features(convs: nn.ModuleList, out: nn.Module, x: torch.Tensor, slope: float) -> list[torch.Tensor]:
    """Every layer's activations (for feature matching), then the logit map."""
    feats = []
    for conv in convs:
        x = F.leaky_relu(conv(x), slope)
        feats.append(x)
    return feats + [out(x)]


class _PeriodDisc(nn.Module):
    def __init__(self, period: int, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.period = period
        layers, c = [], 1
        for out in channels:
            layers.append(_wn(nn.Conv2d(c, out, (5, 1), (3, 1), padding=(2, 0))))
            c = out
        layers.append(_wn(nn.Conv2d(c, c, (5, 1), 1, padding=(2, 0))))
        self.convs = nn.ModuleList(layers)
        self.out = _wn(nn.Conv2d(c, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        return _features(self.convs, self.out, x.view(b, c, -1, self.period), 0.1)


class MultiPeriodDiscriminator(nn.Module):
    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11)):
        super().__init__()
        self.discs = nn.ModuleList(_PeriodDisc(p) for p in periods)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return [d(x) for d in self.discs]


class _STFTDisc(nn.Module):
    def __init__(self, n_fft: int, filters: int = 16):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([
            _wn(nn.Conv2d(2, filters, (3, 9), padding=(1, 4))),
            _wn(nn.Conv2d(filters, filters, (3, 9), (1, 2), padding=(1, 4), dilation=(1, 1))),
            _wn(nn.Conv2d(filters, filters, (3, 9), (1, 2), padding=(2, 4), dilation=(2, 1))),
            _wn(nn.Conv2d(filters, filters, (3, 9), (1, 2), padding=(4, 4), dilation=(4, 1))),
            _wn(nn.Conv2d(filters, filters, (3, 3), padding=(1, 1))),
        ])
        self.out = _wn(nn.Conv2d(filters, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = torch.stft(x.squeeze(1), self.n_fft, self.n_fft // 4, window=self.window, return_complex=True)
        return _features(self.convs, self.out, torch.stack([z.real, z.imag], dim=1).transpose(2, 3), 0.2)


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, ffts: tuple[int, ...] = (1024, 512, 256)):
        super().__init__()
        self.discs = nn.ModuleList(_STFTDisc(n) for n in ffts)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return [d(x) for d in self.discs]


class Discriminators(nn.Module):
    """Both discriminators: one list of per-discriminator feature lists (the last entry is the logit map)."""

    def __init__(self):
        super().__init__()
        self.mpd = MultiPeriodDiscriminator()
        self.msstft = MultiScaleSTFTDiscriminator()

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return self.mpd(x) + self.msstft(x)


def discriminator_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    loss = real[0][-1].new_zeros(())
    for r, f in zip(real, fake, strict=True):
        loss = loss + F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean()
    return loss / len(real)


def generator_adv_loss(fake: list[list[torch.Tensor]]) -> torch.Tensor:
    return sum(F.relu(1 - f[-1]).mean() for f in fake) / len(fake)


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    loss, n = real[0][-1].new_zeros(()), 0
    for r, f in zip(real, fake, strict=True):
        for a, b in zip(r[:-1], f[:-1], strict=True):
            loss = loss + (a.detach() - b).abs().mean() / (a.detach().abs().mean() + 1e-8)
            n += 1
    return loss / n
