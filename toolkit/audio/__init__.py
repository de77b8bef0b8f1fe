"""Neural audio codec: a causal SEANet encoder, residual vector quantization, and a causal decoder
(SEANet's transposed convolutions, or Vocos's predicted spectra and inverse FFT).

- :func:`load_codec` gives an :class:`AudioCodec` (the shipped 16 kHz model by
  default): ``encode(wav, sr, kbps)`` -> :class:`Codes`, ``decode(codes)`` -> samples,
  and streaming ``encoder(kbps)`` / ``decoder()`` objects that give the same
  codes and samples as offline coding.
- The network: :mod:`~toolkit.audio.config` (:class:`AudioNetConfig`),
  :mod:`~toolkit.audio.streaming` (causal convolutions that stream exactly),
  :mod:`~toolkit.audio.seanet` (encoder and SEANet decoder), :mod:`~toolkit.audio.istft`
  (the Vocos-style decoder), :mod:`~toolkit.audio.network` (the quantizer around them,
  for training and for inference).
- :mod:`toolkit.audio.losses` the training losses and discriminators,
  :mod:`toolkit.audio.io` audio files in bounded memory.
- Training: ``python -m toolkit.recipes.train_audio`` (single process or ``torchrun``).
- Files: ``codec compress x.wav --codec audio --set kbps=6`` (:mod:`toolkit.codecs.audio`).
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["codec", "config", "io", "istft", "losses", "network", "seanet", "streaming"],
    submod_attrs={
        "codec": ["AudioCodec", "Codes", "StreamEncoder", "StreamDecoder", "load_codec", "sample_clips"],
        "config": ["AudioNetConfig"],
        "losses": ["mel_distance", "si_sdr"],
        "network": ["InferenceCodec", "SEANetCodec"],
    },
)
