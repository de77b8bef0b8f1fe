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

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["codec", "io", "losses", "model", "train"],
    submod_attrs={
        "codec": ["AudioCodec", "Codes", "StreamEncoder", "StreamDecoder", "load_codec", "sample_clips"],
        "model": ["CodecConfig"],
        "losses": ["mel_distance", "si_sdr"],
    },
)
