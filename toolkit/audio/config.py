"""The codec network's configuration: its shape, its quantizer and the bitrates it serves.

A model directory stores it as ``config.json``'s ``"config"`` (:meth:`Config.to_dict`),
and a training checkpoint carries it too, so the network is rebuilt from it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from toolkit.config import Config, check
from toolkit.errors import ConfigError

__all__ = ["AudioNetConfig"]


@dataclass(frozen=True)
class AudioNetConfig(Config):
    sample_rate: int = 16000
    channels: int = 16
    #: downsampling factors, first to last (their product is the hop)
    ratios: tuple[int, ...] = (2, 4, 5, 8)
    #: latent width, the quantizer's input
    dim: int = 128
    residual_layers: int = 1
    max_channels: int = 256
    codebook_size: int = 1024
    #: 24 quantizers at 50 frames/s and 10 bits: 12 kbps; bitrates below use the first ones
    num_quantizers: int = 24
    #: quantizer dropout keeps a multiple of this many (3 = 1.5 kbps at 50 frames/s)
    dropout_multiple: int = 3
    ema_decay: float = 0.99
    #: a code whose EMA count of uses per step falls below this is restarted from the batch; a step
    #: here has ~400 frames for 1024 codes (0.4 uses per code on average), so 2 (EnCodec's value at
    #: ~5000 frames a step) would restart nearly every code on every step
    dead_code_threshold: float = 0.02
    commitment_weight: float = 1.0
    #: frames per block of the streaming loop (offline coding runs the same blocks)
    block_frames: int = 50
    #: "seanet": transposed convolutions back to samples; "istft": ConvNeXt blocks that predict
    #: short-time spectra, inverted by an inverse FFT and overlap-add (Vocos; Siuzdak 2023)
    decoder: str = "seanet"
    #: width and depth of the istft decoder's ConvNeXt blocks
    decoder_channels: int = 384
    decoder_layers: int = 6
    #: spectra per latent frame in the istft decoder (its hop is hop / this, its window 4 hops)
    decoder_upsample: int = 2

    def __post_init__(self):
        for name in ("sample_rate", "channels", "dim", "residual_layers", "max_channels", "num_quantizers",
                     "block_frames", "decoder_channels", "decoder_layers", "decoder_upsample"):
            value = getattr(self, name)
            check(value >= 1, f"{name} must be a positive whole number, not {value!r}")
        check(len(self.ratios) > 0 and all(r >= 1 for r in self.ratios),
              f"ratios must be positive whole numbers, not {self.ratios!r}")
        check(self.codebook_size >= 2 and self.codebook_size & (self.codebook_size - 1) == 0,
              f"codebook_size must be a power of 2 (whole bits per code), not {self.codebook_size}")
        check(1 <= self.dropout_multiple <= self.num_quantizers,
              f"dropout_multiple must lie in 1..num_quantizers ({self.num_quantizers}), not {self.dropout_multiple}")
        check(0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), not {self.ema_decay}")
        check(0 <= self.dead_code_threshold < math.inf,
              f"dead_code_threshold must be a finite number >= 0 (uses per step), not {self.dead_code_threshold}")
        check(0 <= self.commitment_weight < math.inf,
              f"commitment_weight must be a finite number >= 0, not {self.commitment_weight}")
        check(self.decoder in ("seanet", "istft"), f"decoder must be 'seanet' or 'istft', not {self.decoder!r}")
        check(self.decoder != "istft" or self.hop % self.decoder_upsample == 0,
              f"decoder_upsample must divide the hop ({self.hop}), got {self.decoder_upsample}")

    @property
    def hop(self) -> int:
        return math.prod(self.ratios)

    @property
    def stft_hop(self) -> int:
        return self.hop // self.decoder_upsample

    @property
    def decoder_lag(self) -> int:
        """Samples by which the decoder's output trails its codes: the istft decoder's overlap-add
        completes a sample only once the 3 spectra after it are in."""
        return 0 if self.decoder == "seanet" else 3 * self.stft_hop

    def frames_for(self, samples: int) -> int:
        """Frames that code ``samples`` samples: whole frames, and enough to complete the decoder's output."""
        return -(-(samples + self.decoder_lag) // self.hop) if samples > 0 else 0

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def bits_per_code(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def bitrates(self) -> tuple[float, ...]:
        """The bitrates quantizer dropout trained (kbps before entropy coding): multiples of the smallest."""
        return tuple(q * self.frame_rate * self.bits_per_code / 1000
                     for q in range(self.dropout_multiple, self.num_quantizers + 1, self.dropout_multiple))

    def quantizers_for(self, kbps: float) -> int:
        """How many quantizers give ``kbps`` (before entropy coding); another bitrate is a ConfigError."""
        n = kbps * 1000 / (self.frame_rate * self.bits_per_code)
        if abs(n - round(n)) > 1e-6 or round(n) % self.dropout_multiple or not 1 <= round(n) <= self.num_quantizers:
            rates = ", ".join(f"{r:g}" for r in self.bitrates)
            raise ConfigError(f"{kbps:g} kbps is not a bitrate of this model (it has {rates} kbps)")
        return int(round(n))
