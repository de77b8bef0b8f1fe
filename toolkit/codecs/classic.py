"""Classical codecs: ``store``, ``zstd`` and ``xz``.

They are the baselines every learned codec is measured against and the
fallbacks the container and ``--codec auto`` use. Each chunk is coded
independently, so decoding memory is bounded by the chunk size.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass

import zstandard

from toolkit.codecs.registry import Codec, register_codec
from toolkit.errors import ConfigError, FormatError

__all__ = ["StoreCodec", "ZstdCodec", "XzCodec"]

#: larger chunks help the dictionary coders; 8 MiB keeps decode memory modest.
CLASSIC_CHUNK = 8 << 20


class _PerChunk(Codec):
    chunk_size = CLASSIC_CHUNK

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        return [self.encode(c) for c in chunks]

    def decode_chunks(self, payloads, sizes, known):
        return [k if p is None else self.decode(p, n) for p, n, k in zip(payloads, sizes, known, strict=True)]

    def encode(self, raw: bytes) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes, size: int) -> bytes:
        raise NotImplementedError


@register_codec("store")
class StoreCodec(_PerChunk):
    """Raw bytes inside the container: framing, CRCs and digest only."""

    description = "no compression (framing and checksums only)"

    def encode(self, raw: bytes) -> bytes:
        return raw

    def decode(self, payload: bytes, size: int) -> bytes:
        return payload

    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        return 8.0


@dataclass
class ZstdConfig:
    level: int = 19

    def __post_init__(self):
        if not 1 <= self.level <= 22:
            raise ConfigError(f"zstd level must be in 1..22, got {self.level}")


@register_codec("zstd")
class ZstdCodec(_PerChunk):
    """Zstandard (python-zstandard), one frame per chunk."""

    description = "Zstandard, level 19 by default (set level=1..22)"
    Config = ZstdConfig

    def encode(self, raw: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.config.level).compress(raw)

    def decode(self, payload: bytes, size: int) -> bytes:
        try:
            return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
        except zstandard.ZstdError as e:
            raise FormatError(f"bad zstd data: {e}") from None

    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        return 8 * len(cls().encode(sample)) / max(1, len(sample))


@dataclass
class XzConfig:
    preset: int = 9
    extreme: bool = True

    def __post_init__(self):
        if not 0 <= self.preset <= 9:
            raise ConfigError(f"xz preset must be in 0..9, got {self.preset}")


@register_codec("xz")
class XzCodec(_PerChunk):
    """LZMA2 in a raw .xz stream (Python's lzma), one stream per chunk."""

    description = "xz / LZMA2, preset 9 extreme by default"
    Config = XzConfig

    def encode(self, raw: bytes) -> bytes:
        preset = self.config.preset | (lzma.PRESET_EXTREME if self.config.extreme else 0)
        return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=preset)

    def decode(self, payload: bytes, size: int) -> bytes:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            # one byte of headroom lets a correct stream reach its end marker
            out = d.decompress(payload, max_length=size + 1)
        except lzma.LZMAError as e:
            raise FormatError(f"bad xz data: {e}") from None
        if not d.eof:
            raise FormatError("xz stream does not end where the chunk does")
        return out

    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        return 8 * len(cls().encode(sample)) / max(1, len(sample))
