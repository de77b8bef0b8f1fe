"""Audio files in bounded memory: read any soundfile format as mono blocks at one rate; write WAV.

:class:`AudioReader` opens a file (or a non-seekable stream, spooled to a
temporary file first, since libsndfile must seek), scans it once for what a
decoder should be told (sample rate, channels, NaN and out-of-range samples)
and then yields float32 mono blocks at the target rate: channels averaged,
NaN set to silence, samples clipped to [-1, 1], and resampled block by block
with enough context either side that the joins match a whole-file resampling.
"""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from toolkit.errors import UnsupportedInputError

__all__ = ["AudioReader", "resample", "wav_header", "to_pcm16", "WAV_HEADER_BYTES"]

WAV_HEADER_BYTES = 44
_MAX_WAV_DATA = 0xFFFFFFFF - 36


#: torchaudio's resampler builds ``new/g`` filters of about ``orig/g`` taps (g their gcd): rates whose
#: ratio does not reduce below this on both sides would need a filter bank of gigabytes
MAX_RATIO_TERM = 4096


def check_rates(orig: int, new: int) -> None:
    g = math.gcd(orig, new)
    if orig // g > MAX_RATIO_TERM or new // g > MAX_RATIO_TERM:
        raise UnsupportedInputError(f"cannot resample {orig} Hz to {new} Hz here (the ratio {orig // g}/{new // g} "
                                    "needs too large a filter bank); resample the file to a common rate first")


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Whole-signal resampling with torchaudio's windowed-sinc resampler."""
    if orig == new:
        return np.ascontiguousarray(x, dtype=np.float32)
    check_rates(orig, new)
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), orig, new).numpy()


class _BlockResampler:
    """Resamples a stream block by block.

    Blocks are cut at multiples of ``orig / gcd`` input samples, where input and
    output sample positions coincide, and each is resampled with ``ctx`` real
    input samples on both sides (zeros before the start), which covers the
    sinc kernel's reach (6 zero crossings); the middle of the output is kept.
    """

    def __init__(self, orig: int, new: int):
        g = math.gcd(orig, new)
        self.orig, self.new, self.o, self.n = orig, new, orig // g, new // g
        self.ctx = self.o * math.ceil(256 / self.o)
        self.left = np.zeros(self.ctx, np.float32)
        self.pending = np.zeros(0, np.float32)

    def _run(self, core: int, right: np.ndarray) -> np.ndarray:
        seg = np.concatenate([self.left, self.pending[:core], right])
        y = resample(seg, self.orig, self.new)
        a = self.ctx // self.o * self.n
        out = y[a: a + core // self.o * self.n]
        self.left = np.concatenate([self.left, self.pending[:core]])[-self.ctx:]
        self.pending = self.pending[core:]
        return out

    def push(self, x: np.ndarray) -> np.ndarray:
        self.pending = np.concatenate([self.pending, x])
        core = (self.pending.size - self.ctx) // self.o * self.o
        if core <= 0:
            return np.zeros(0, np.float32)
        return self._run(core, self.pending[core:core + self.ctx])

    def flush(self) -> np.ndarray:
        core = math.ceil(self.pending.size / self.o) * self.o
        self.pending = np.concatenate([self.pending, np.zeros(core - self.pending.size, np.float32)])
        return self._run(core, np.zeros(self.ctx, np.float32)) if core else np.zeros(0, np.float32)


class AudioReader:
    """An audio file as float32 mono blocks at ``rate``, with notes on what was changed."""

    def __init__(self, src: BinaryIO, rate: int, block_seconds: float = 30.0):
        import soundfile as sf

        self._spool = None
        if not _seekable(src):
            self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
            shutil.copyfileobj(src, self._spool, 1 << 20)
            self._spool.seek(0)
            src = self._spool
        self.bytes_read = 0
        try:
            start = src.tell()
            self.f = sf.SoundFile(src)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
            self.close()
            raise UnsupportedInputError(f"not an audio file that libsndfile reads (WAV, FLAC, OGG, ...): {e}") from None
        self.src, self.start = src, start
        self.rate, self.out_rate = int(self.f.samplerate), rate
        try:
            check_rates(self.rate, rate)
        except UnsupportedInputError:
            self.close()
            raise
        self.channels, self.frames = int(self.f.channels), int(self.f.frames)
        self.format = f"{self.f.format}/{self.f.subtype}"
        self.block = max(1, int(block_seconds * self.rate))
        self.nonfinite = self.clipped = 0
        for b in self._raw_blocks():
            self.nonfinite += int((~np.isfinite(b)).sum())
            self.clipped += int((np.abs(np.nan_to_num(b)) > 1.0).sum())
        self.bytes_read = src.seek(0, 2) - start
        self.out_frames = -(-self.frames * rate // self.rate)

    def _raw_blocks(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        self.f.seek(0)
        try:
            yield from self.f.blocks(self.block, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise UnsupportedInputError(f"the audio data is damaged: {e}") from None

    def notes(self) -> list[str]:
        out = []
        if self.rate != self.out_rate:
            out.append(f"resampled from {self.rate} Hz to {self.out_rate} Hz")
        if self.channels != 1:
            out.append(f"downmixed from {self.channels} channels to mono")
        if self.nonfinite:
            out.append(f"{self.nonfinite} NaN or infinite samples set to silence")
        if self.clipped:
            out.append(f"{self.clipped} samples outside [-1, 1] clipped")
        return out

    def blocks(self) -> Iterator[np.ndarray]:
        """Float32 mono blocks at the output rate, ``out_frames`` samples in all."""
        rs = _BlockResampler(self.rate, self.out_rate) if self.rate != self.out_rate else None
        left = self.out_frames
        for b in self._raw_blocks():
            x = np.clip(np.nan_to_num(b.mean(axis=1), nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
            y = rs.push(x) if rs else x
            y = y[:left]
            left -= y.size
            if y.size:
                yield y.astype(np.float32, copy=False)
        if rs:
            y = rs.flush()[:left]
            left -= y.size
            if y.size:
                yield y
        if left > 0:  # the resampler's last output rounds down: pad to the promised length
            yield np.zeros(left, np.float32)

    def close(self) -> None:
        if getattr(self, "f", None) is not None:
            self.f.close()
        if self._spool is not None:
            self._spool.close()


def _seekable(f: BinaryIO) -> bool:
    try:
        return f.seekable() and f.tell() >= 0
    except (OSError, AttributeError, ValueError):
        return False


def wav_header(num_samples: int, rate: int, channels: int = 1) -> bytes:
    """The 44-byte RIFF header of 16-bit PCM. Written by hand because the decoder streams to pipes,
    where libsndfile, which seeks back to fill in the sizes, cannot write."""
    data = 2 * channels * num_samples
    if data > _MAX_WAV_DATA:
        raise UnsupportedInputError(f"{num_samples} samples do not fit a WAV file (4 GiB)")
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * 2 * channels, 2 * channels, 16) +
            b"data" + struct.pack("<I", data))


def to_pcm16(y: np.ndarray) -> bytes:
    return np.clip(np.round(y * 32767.0), -32768, 32767).astype("<i2").tobytes()
