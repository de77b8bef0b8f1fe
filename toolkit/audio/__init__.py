"""Neural audio codec: a causal SEANet encoder, residual vector quantization, and a causal decoder
(SEANet's transposed convolutions, or Vocos's predicted spectra and inverse FFT).

- :func:`load_codec` gives an :class:`AudioCodec` (the shipped 16 kHz model by
  default): ``encode(wav, sr, kbps)`` -> :class:`Codes`, ``decode(codes)`` -> samples,
  and streaming ``encoder(kbps)`` / ``decoder()`` objects that give the same
  codes and samples as offline coding.
- :mod:`toolkit.audio.model` the network, :mod:`toolkit.audio.losses` the
  training losses and discriminators, :mod:`toolkit.audio.train` the training
  command (single process or ``torchrun``), :mod:`toolkit.audio.io` audio files
  in bounded memory.
- Files: ``codec compress x.wav --codec audio --set kbps=6`` (:mod:`toolkit.codecs.audio`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AudioCodec", "Codes", "StreamEncoder", "StreamDecoder", "load_codec", "sample_clips", "CodecConfig",
           "mel_distance", "si_sdr"]

_WHERE = {"AudioCodec": "codec", "Codes": "codec", "StreamEncoder": "codec", "StreamDecoder": "codec",
          "load_codec": "codec", "sample_clips": "codec", "CodecConfig": "model", "mel_distance": "losses",
          "si_sdr": "losses"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"toolkit.audio.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit.audio' has no attribute {name!r}")
