"""The trained audio codec as a library: waveforms to codes and back, offline or streamed.

>>> codec = toolkit.audio.load_codec()              # the shipped 16 kHz model
>>> codes = codec.encode(wav, sr=44100, kbps=6)     # resampled and downmixed to 16 kHz mono
>>> out = codec.decode(codes)                       # float32 samples at codec.sample_rate
>>> enc = codec.encoder(kbps=3)                     # streaming: push samples, get codes
>>> frames = [enc.push(block) for block in blocks] + [enc.flush()]

Codes are ``[n_q, frames]`` integers: the first ``n_q`` residual codebooks,
50 frames a second, 10 bits each before entropy coding, so 1.5, 3, 6 and 12
kbps are 3, 6, 12 and 24 codebooks. :attr:`AudioCodec.priors` are the
per-codebook code frequencies measured on training audio, which the file
codec entropy-codes with.

Offline coding is the streaming loop run over the whole signal: both feed
the network blocks of ``block_frames`` frames and carry each convolution's
state from block to block, so streamed and offline coding give identical
codes and samples, however the input is split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.audio.config import AudioNetConfig
from toolkit.audio.network import InferenceCodec
from toolkit.audio.streaming import StreamingState
from toolkit.errors import ConfigError, ModelMismatchError, UnsupportedInputError

__all__ = ["AudioCodec", "Codes", "StreamEncoder", "StreamDecoder", "load_codec", "sample_clips", "DEFAULT_MODEL"]

DEFAULT_MODEL = "audio-16k"


@dataclass
class Codes:
    """What :meth:`AudioCodec.encode` gives: the codes and what decoding needs to know."""

    codes: np.ndarray  # int16 [n_q, frames]
    num_samples: int  # samples at the codec's rate that the codes stand for
    sample_rate: int
    kbps: float


def _as_mono(wav: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32 mono samples from ``[T]``, ``[T, C]`` or ``[C, T]`` (fewer channels than samples)."""
    x = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if x.dtype.kind not in "fiu":
        raise UnsupportedInputError(f"audio samples must be numbers, not {x.dtype}")
    if x.dtype.kind in "iu":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    if x.ndim == 2:
        x = x.mean(axis=1 if x.shape[0] >= x.shape[1] else 0)
    if x.ndim != 1:
        raise UnsupportedInputError(f"audio must be [samples] or [samples, channels], got shape {x.shape}")
    return clean(x.astype(np.float32, copy=False))


def clean(x: np.ndarray) -> np.ndarray:
    """NaN to silence and everything into [-1, 1] (the network never saw anything else)."""
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(x, -1.0, 1.0)


class StreamEncoder:
    """Samples in (any number per :meth:`push`), codes out a block at a time; :meth:`flush` ends the stream."""

    def __init__(self, codec: AudioCodec, n_q: int):
        self.codec, self.n_q = codec, n_q
        self.block = codec.cfg.block_frames * codec.cfg.hop
        self.pending = np.zeros(0, np.float32)
        self.state: StreamingState = {}
        self.samples = self.frames = 0

    def _run(self, x: np.ndarray) -> np.ndarray:
        net = self.codec.net
        self.frames += x.size // self.codec.cfg.hop
        with torch.inference_mode():
            z = net.encoder.step(torch.from_numpy(x).view(1, 1, -1), self.state)
            return net.quantize(z, self.n_q)[0].numpy().astype(np.int16)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Codes ``[n_q, frames]`` of every whole block now available (often none)."""
        x = clean(np.asarray(samples, dtype=np.float32).reshape(-1))
        self.samples += x.size
        self.pending = np.concatenate([self.pending, x])
        n = self.pending.size // self.block * self.block
        out = [self._run(self.pending[i:i + self.block]) for i in range(0, n, self.block)]
        self.pending = self.pending[n:]
        return np.concatenate(out, axis=1) if out else np.zeros((self.n_q, 0), np.int16)

    def flush(self) -> np.ndarray:
        """The codes of what is left, padded with silence to the frames the decoder needs to play it all
        (:meth:`AudioNetConfig.frames_for`: whole frames, and the decoder's lag)."""
        missing = self.codec.cfg.frames_for(self.samples) - self.frames
        if missing <= 0:
            return np.zeros((self.n_q, 0), np.int16)
        x = np.zeros(missing * self.codec.cfg.hop, np.float32)
        x[: self.pending.size] = self.pending
        self.pending = np.zeros(0, np.float32)
        return self._run(x)


class StreamDecoder:
    """Codes in (any number of frames per :meth:`push`), samples out a block at a time."""

    def __init__(self, codec: AudioCodec):
        self.codec = codec
        self.pending: np.ndarray | None = None
        self.state: StreamingState = {}

    def _run(self, codes: np.ndarray) -> np.ndarray:
        net = self.codec.net
        with torch.inference_mode():
            z = net.dequantize(torch.from_numpy(codes.astype(np.int64))[None])
            return net.decoder.step(z, self.state)[0, 0].numpy()

    def push(self, codes: np.ndarray) -> np.ndarray:
        codes = self.codec.check_codes(codes)
        if self.pending is not None and codes.shape[0] != self.pending.shape[0]:
            raise ConfigError(f"a stream keeps its number of codebooks ({self.pending.shape[0]}), got {codes.shape[0]}")
        self.pending = codes if self.pending is None else np.concatenate([self.pending, codes], axis=1)
        b = self.codec.cfg.block_frames
        n = self.pending.shape[1] // b * b
        out = [self._run(self.pending[:, i:i + b]) for i in range(0, n, b)]
        self.pending = self.pending[:, n:]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flush(self) -> np.ndarray:
        """The rest of the stream: the frames short of a block, and what the decoder still holds.
        It ends the stream: a decoder that lags its codes gives up the samples it held back."""
        out = []
        if self.pending is not None and self.pending.shape[1]:
            out.append(self._run(self.pending))
            self.pending = self.pending[:, :0]
        finish = getattr(self.codec.net.decoder, "finish", None)
        if finish is not None:
            out.append(finish(self.state)[0, 0].numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class AudioCodec:
    """A trained codec network with its configuration and code priors."""

    def __init__(self, net: InferenceCodec, priors: np.ndarray, sha256: str = "", name: str = ""):
        self.net = net.eval()
        self.cfg: AudioNetConfig = net.cfg
        self.priors = priors  # int64 [num_quantizers, codebook_size], each row summing to 2**16
        self.sha256, self.name = sha256, name

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def bitrates(self) -> tuple[float, ...]:
        return self.cfg.bitrates

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or not 1 <= codes.shape[0] <= self.cfg.num_quantizers:
            raise ConfigError(f"codes must be [n_q <= {self.cfg.num_quantizers}, frames], got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.cfg.codebook_size):
            raise ConfigError(f"codes must lie in 0..{self.cfg.codebook_size - 1}")
        return codes

    def encoder(self, kbps: float = 6.0) -> StreamEncoder:
        return StreamEncoder(self, self.quantizers_for(kbps))

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def quantizers_for(self, kbps: float) -> int:
        """How many codebooks ``kbps`` uses; a bitrate the model was not trained for is a ConfigError."""
        try:
            kbps = float(kbps)
        except (TypeError, ValueError):
            raise ConfigError(f"kbps must be a number, not {kbps!r}") from None
        return self.cfg.quantizers_for(kbps)

    def encode(self, wav: np.ndarray | torch.Tensor, sr: int, kbps: float = 6.0) -> Codes:
        """Codes of ``wav`` (mono or ``[samples, channels]``, any rate: resampled to the codec's)."""
        if not isinstance(sr, int | np.integer) or sr <= 0:
            raise ConfigError(f"sample rate must be a positive integer, got {sr!r}")
        x = _as_mono(wav)
        if sr != self.sample_rate:
            from toolkit.audio.io import resample

            x = resample(x, int(sr), self.sample_rate)
        enc = self.encoder(kbps)
        codes = np.concatenate([enc.push(x), enc.flush()], axis=1)
        return Codes(codes, int(x.size), self.sample_rate, float(kbps))

    def decode(self, codes: Codes | np.ndarray) -> np.ndarray:
        """Float32 samples at :attr:`sample_rate` (``num_samples`` of them when given :class:`Codes`)."""
        arr = codes.codes if isinstance(codes, Codes) else codes
        dec = self.decoder()
        y = np.concatenate([dec.push(arr), dec.flush()])
        if isinstance(codes, Codes):
            y = y[: codes.num_samples]
        return y


def load_codec(name: str | Path = DEFAULT_MODEL) -> AudioCodec:
    """A shipped model by name (``audio-16k``) or a directory that ``toolkit.recipes.train_audio --export``
    wrote."""
    from toolkit.models import store

    def load(where) -> AudioCodec:
        path = Path(where.path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise ModelMismatchError(f"{path} is not an audio codec model (config.json, model.safetensors)")
        from safetensors.torch import load_file

        meta = json.loads((path / "config.json").read_text())
        cfg = AudioNetConfig.from_dict(meta["config"])
        state = load_file(str(path / "model.safetensors"))
        net = InferenceCodec(cfg)
        net.load_state(state)
        priors = state["priors"].numpy().astype(np.int64)
        sha = store.files_sha256([path / "config.json", path / "model.safetensors"])
        return AudioCodec(net, priors, sha, str(name))

    return store.load("audio", load, str(name))


def sample_clips() -> dict[str, Path]:
    """The shipped example clips (16 kHz FLAC; held out from training): ``speech`` and ``music``."""
    from toolkit.models.store import ASSETS

    root = ASSETS / "audio-samples"
    return {"speech": root / "speech_allison.flac", "music": root / "music_midi.flac"}
