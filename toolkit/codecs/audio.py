"""The ``audio`` codec: lossy coding of sound with the trained neural codec (:mod:`toolkit.audio`).

``codec compress speech.wav --codec audio --set kbps=6`` reads any file
libsndfile reads (WAV, FLAC, OGG, ...), downmixes it to mono and resamples it
to the model's rate (16 kHz), noting both in the header, and codes it in
chunks of 30 seconds, streaming, in bounded memory. ``codec decompress``
writes a 16-bit WAV file at the model's rate.

A lossy codec: the container's digest covers the coded chunks, not the
decoded samples (which differ from the input by design and, in their last
bits, between machines). Each record's size is the number of WAV bytes its
chunk decodes to (the first one includes the 44-byte WAV header), so the
decoder writes the WAV header first and then samples as they come.

What it promises: decoding a file gives exactly the samples that the
library's offline decoding (:meth:`AudioCodec.decode`) gives for the same
codes, on any machine and however the file is cut into chunks. The streaming
decoder buffers codes into whole blocks of ``block_frames`` frames, so both
run the network on the same blocks (only the stream's last one is shorter):
the same arithmetic on the same shapes. Coding likewise: a file at the
model's rate gets the codes of the offline encoding of its samples as
libsndfile reads them (16-bit PCM as k / 32768). Between machines float
rounding may differ, so one input may get another code where two codewords
are nearly tied, and decoded samples may differ in their last bits; the
codes a file holds, which its digest covers, do not.

Payload of a chunk: the frame count (varint), then one ANS stream of the
chunk's codes, codebook by codebook, each codebook under its own frequency
table: the per-codebook code frequencies the model measured on its training
audio (``priors``). Codes are 10-bit before this step, fewer after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import BinaryIO

from toolkit.codecs.registry import Codec, DecodeSession, ProgressFn, SourceSession, register_codec
from toolkit.config import Config
from toolkit.errors import FormatError, ModelMismatchError, ToolkitError
from toolkit.formats.binary import ByteReader, varint

__all__ = ["AudioFileConfig", "AudioFileCodec"]

logger = logging.getLogger(__name__)

_SHIPPED = "audio-16k"
CHUNK_SECONDS = 30
#: a decoder refuses files that claim more samples than this (24 hours at 16 kHz; WAV's limit is 37 hours)
MAX_SAMPLES = 24 * 3600 * 16000


@dataclass(frozen=True)
class AudioFileConfig(Config):
    """The audio file codec's settings, written into every file's header (field names and order are
    the header's ``config``)."""

    versioned = False  # a header's config: the codec's version is the header's

    #: bitrate before entropy coding; the model's bitrates (1.5, 3, 6, 12 for the shipped one)
    kbps: float = 6.0
    #: a model directory (``toolkit.recipes.train_audio --export``); "": the shipped model
    model: str = ""


def _model(config: AudioFileConfig, model_dir: str | None = None):
    from toolkit.audio.codec import load_codec
    from toolkit.models import store

    name = config.model or _SHIPPED
    if model_dir is not None:
        name = str(store.locate(name, model_dir).path)
    return load_codec(name)


def frames_through(cfg, done: int, total: int) -> int:
    """How many frames the chunks covering samples ``[0, done)`` of ``total`` hold.

    A chunk carries the frames its samples need: with a decoder that lags its
    codes (the istft decoder, :attr:`AudioNetConfig.decoder_lag`), the whole
    blocks of frames that complete its last sample; the final chunk ends with
    the frames that complete the stream (:meth:`AudioNetConfig.frames_for`).
    """
    if done <= 0:
        return 0
    if done >= total:
        return cfg.frames_for(total)
    if not cfg.decoder_lag:
        return -(-done // cfg.hop)
    block = cfg.block_frames * cfg.hop
    return min(cfg.frames_for(total), -(-(done + cfg.decoder_lag) // block) * cfg.block_frames)


class _Encoder(SourceSession):
    """Reads the whole source itself (the container hands it over): codes come out chunk by chunk."""

    def __init__(self, codec: AudioFileCodec, reader):
        from toolkit.audio.io import WAV_HEADER_BYTES

        self.codec, self.reader = codec, reader
        self.model = codec.model
        self.n_q = self.model.quantizers_for(codec.config.kbps)
        self.chunk_frames = CHUNK_SECONDS * int(self.model.cfg.frame_rate)
        self.first_extra = WAV_HEADER_BYTES

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def header_fields(self) -> dict:
        r = self.reader
        return {"audio": {"sample_rate": r.out_rate, "samples": r.out_frames, "source_rate": r.rate,
                          "source_channels": r.channels, "source_format": r.format, "notes": r.notes()}}

    def notes(self) -> list[str]:
        return self.reader.notes()

    def summary(self) -> dict:
        return {"seconds": self.reader.out_frames / self.reader.out_rate}

    def close(self) -> None:
        self.reader.close()

    def payloads(self, progress: ProgressFn | None = None):
        """``(raw_len, payload)`` of every chunk, in order."""
        import numpy as np

        enc = self.model.encoder(self.codec.config.kbps)
        cfg, total = self.model.cfg, self.reader.out_frames
        pending = np.zeros((self.n_q, 0), np.int16)
        coded = reported = 0  # samples in the chunks yielded; progress reported

        def ready(final: bool):
            nonlocal coded, pending
            while coded < total or (final and self.first_extra):
                n = min(total - coded, self.chunk_frames * cfg.hop)
                k = frames_through(cfg, coded + n, total) - frames_through(cfg, coded, total)
                if pending.shape[1] < k:
                    if final:
                        raise ToolkitError(f"audio encoder produced {pending.shape[1]} frames, {k} expected")
                    return
                yield self._chunk(pending[:, :k], n)
                coded += n
                pending = pending[:, k:]

        for block in self.reader.blocks():
            pending = np.concatenate([pending, enc.push(block)], axis=1)
            yield from ready(final=False)
            if progress:
                new = int(self.reader.bytes_read * coded / max(1, total))
                progress(new - reported)
                reported = new
        pending = np.concatenate([pending, enc.flush()], axis=1)
        yield from ready(final=True)
        if pending.shape[1]:
            raise ToolkitError(f"audio encoder produced {pending.shape[1]} frames past the end of the input")

    def _chunk(self, codes, samples: int) -> tuple[int, bytes]:
        from toolkit.entropy import encode_iid_groups

        raw_len = 2 * samples + self.first_extra
        self.first_extra = 0
        groups = [(codes[i], self.model.priors[i]) for i in range(codes.shape[0])]
        return raw_len, varint(codes.shape[1]) + encode_iid_groups(groups)


class _Decoder(DecodeSession):
    def __init__(self, codec: AudioFileCodec):
        import numpy as np

        self.codec = codec
        self.model = codec.model
        self.n_q = self.model.quantizers_for(codec.config.kbps)
        self.stream = self.model.decoder()
        self.samples_left = codec.samples
        self.first = True
        self.played = np.zeros(0, np.float32)  # decoded samples not yet written (with a lagging decoder, a block)

    def decode_chunks(self, payloads, sizes, known):
        import numpy as np

        from toolkit.audio.io import WAV_HEADER_BYTES, to_pcm16, wav_header
        from toolkit.entropy import decode_iid_groups

        out = []
        cfg = self.model.cfg
        for payload, size in zip(payloads, sizes, strict=True):
            if payload is None:
                raise FormatError("audio chunks are always coded by the codec")
            head = b""
            if self.first:
                head, size = wav_header(self.codec.samples, self.model.sample_rate), size - WAV_HEADER_BYTES
                self.first = False
            if size < 0 or size % 2 or size // 2 > self.samples_left:
                raise FormatError(f"audio chunk of {size} bytes does not fit the {self.samples_left} samples left")
            samples = size // 2
            reader = ByteReader(payload, "audio payload")
            done, total = self.codec.samples - self.samples_left, self.codec.samples
            frames = reader.varint(cfg.frames_for(total))
            expected = frames_through(cfg, done + samples, total) - frames_through(cfg, done, total)
            if frames != expected:
                raise FormatError(f"audio chunk has {frames} frames for {samples} samples, not {expected}")
            codes = decode_iid_groups(reader.take(reader.remaining),
                                      [(self.model.priors[i], frames) for i in range(self.n_q)])
            if frames:
                self.played = np.concatenate([self.played, self.stream.push(np.stack(codes))])
            if self.played.size < samples:  # only once every frame is in: the stream's end
                self.played = np.concatenate([self.played, self.stream.flush()])
            if self.played.size < samples:
                raise FormatError(f"audio chunk decodes to {self.played.size} samples, not {samples}")
            self.samples_left -= samples
            out.append(head + to_pcm16(self.played[:samples]))
            self.played = self.played[samples:]
        return out


@register_codec("audio")
class AudioFileCodec(Codec):
    """Neural audio codec: WAV/FLAC/OGG in, 16 kHz WAV out, 1.5-12 kbps."""

    description = "lossy neural audio codec: WAV/FLAC/OGG in, 16 kHz WAV out (set kbps=1.5|3|6|12)"
    #: 2: a chunk holds the frames a lagging decoder needs (``frames_through``); for a lag of 0 that is
    #: version 1's ceil(samples / hop), so version 1 files still decode
    version = 2
    reads_versions = (1,)
    Config = AudioFileConfig
    lossy = True
    chunk_fallback = False
    decode_settings = ("model_dir",)

    def __init__(self, config: AudioFileConfig | None = None, model_dir: str | None = None):
        super().__init__(config)
        self.model_dir = model_dir
        self.samples = 0
        self.model = _model(self.config, model_dir)
        self.model.quantizers_for(self.config.kbps)  # an unknown bitrate fails here, before any input is read
        self.chunk_size = 2 * CHUNK_SECONDS * self.model.sample_rate + 44

    def header_fields(self) -> dict:
        return {"model": self.config.model or _SHIPPED, "model_sha256": self.model.sha256}

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> AudioFileCodec:
        base = super().from_header(header, local)
        codec = cls(base.config, model_dir=(local or {}).get("model_dir"))
        model = codec.model
        if header.get("model_sha256") != model.sha256:
            raise ModelMismatchError(f"file was coded with audio model {header.get('model')!r} "
                                     f"(sha256 {str(header.get('model_sha256'))[:12]}), not this one "
                                     f"({model.sha256[:12]})")
        audio = header.get("audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("samples"), int):
            raise FormatError("audio header lacks its sample count")
        if not 0 <= audio["samples"] <= MAX_SAMPLES or audio.get("sample_rate") != model.sample_rate:
            raise FormatError(f"audio header: {audio.get('samples')} samples at {audio.get('sample_rate')} Hz "
                              "is not something this codec wrote")
        codec.samples = audio["samples"]
        return codec

    def open_source(self, src: BinaryIO) -> _Encoder:
        from toolkit.audio.io import AudioReader

        return _Encoder(self, AudioReader(src, self.model.sample_rate))

    def open_decoder(self, progress: ProgressFn | None = None) -> DecodeSession:
        return _Decoder(self)

