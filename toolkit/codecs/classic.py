"""Classical codecs: ``store``, ``zstd`` and ``xz``.

They are the baselines every learned codec is measured against and the
fallbacks ``--codec auto`` uses. ``zstd`` and ``xz`` code a file as one
stream that runs across the container's chunks, as the command-line tools
do, so their dictionary never restarts: each chunk's payload is the stream
up to a flush point (zstd's block flush, liblzma's sync flush) and decodes,
after the pieces before it, to exactly that chunk. Memory stays bounded both
ways: one chunk plus the coder's window.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass

import zstandard

from toolkit.codecs.lzma_flush import LZMA2Encoder
from toolkit.codecs.registry import Codec, DecodeSession, EncodeSession, register_codec
from toolkit.config import Config, check
from toolkit.errors import FormatError

__all__ = ["StoreCodec", "ZstdCodec", "XzCodec"]

#: raw bytes per chunk: the unit of CRCs, progress and memory; the stream runs across chunks.
CLASSIC_CHUNK = 8 << 20
#: a damaged zstd piece is fed this many bytes at a time, so its output is checked against the
#: chunk's size before it can grow: one zstd block (>= 3 bytes) yields at most 128 KiB.
_ZSTD_FEED = 1 << 10


@register_codec("store")
class StoreCodec(Codec):
    """Raw bytes inside the container: framing, CRCs and digest only."""

    description = "no compression (framing and checksums only)"
    chunk_fallback = False

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        return list(chunks)

    def decode_chunks(self, payloads, sizes, known):
        return list(payloads)


class _StreamCodec(Codec):
    """A classic codec whose chunks are consecutive pieces of one stream."""

    chunk_size = CLASSIC_CHUNK
    chunk_fallback = False  # a piece replaced by raw bytes would leave a hole in the stream

    def compress_whole(self, data: bytes) -> bytes:
        """The codec's payload for ``data`` as one piece (what ``auto`` measures)."""
        session = self.open_encoder()
        try:
            return session.encode_chunks([data])[0] if data else b""
        finally:
            session.close()


@dataclass(frozen=True)
class ZstdConfig(Config):
    versioned = False  # a header's config: the codec's version is the header's

    level: int = 19

    def __post_init__(self):
        check(1 <= self.level <= 22, f"zstd level must be in 1..22, got {self.level}")


class _ZstdEncoder(EncodeSession):
    def __init__(self, level: int):
        # level 19 with an unknown size takes zstd's large-input parameters (8 MiB window), as
        # `zstd -19` does on a big file; magicless frames: the container already has a magic
        params = zstandard.ZstdCompressionParameters.from_level(level, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        self._c = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        return [self._c.compress(c) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for c in chunks]


class _ZstdDecoder(DecodeSession):
    def __init__(self):
        dctx = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        self._d = dctx.decompressobj()

    def decode_chunks(self, payloads, sizes, known):
        out = []
        for payload, size in zip(payloads, sizes, strict=True):
            parts, got = [], 0
            try:
                for i in range(0, len(payload), _ZSTD_FEED):
                    part = self._d.decompress(payload[i : i + _ZSTD_FEED])
                    got += len(part)
                    if got > size:
                        raise FormatError("zstd piece decodes to more than its chunk")
                    parts.append(part)
            except zstandard.ZstdError as e:
                raise FormatError(f"bad zstd data: {e}") from None
            out.append(b"".join(parts))
        return out


@register_codec("zstd")
class ZstdCodec(_StreamCodec):
    """Zstandard (python-zstandard): one frame across the file, a block flush per chunk."""

    version = 2
    description = "Zstandard, level 19 by default (set level=1..22)"
    Config = ZstdConfig

    def open_encoder(self, progress=None) -> EncodeSession:
        return _ZstdEncoder(self.config.level)

    def open_decoder(self, progress=None) -> DecodeSession:
        return _ZstdDecoder()


@dataclass(frozen=True)
class XzConfig(Config):
    versioned = False  # a header's config: the codec's version is the header's

    preset: int = 9
    extreme: bool = True

    def __post_init__(self):
        check(0 <= self.preset <= 9, f"xz preset must be in 0..9, got {self.preset}")

    @property
    def flags(self) -> int:
        return self.preset | (lzma.PRESET_EXTREME if self.extreme else 0)


class _XzEncoder(EncodeSession):
    def __init__(self, preset: int):
        self._e = LZMA2Encoder(preset)

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        return [self._e.flush_piece(c) for c in chunks]

    def close(self) -> None:
        self._e.close()


class _XzDecoder(DecodeSession):
    def __init__(self, preset: int):
        # a raw LZMA2 decoder needs only the dictionary size, which the preset sets
        self._d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": preset}])

    def decode_chunks(self, payloads, sizes, known):
        out = []
        for payload, size in zip(payloads, sizes, strict=True):
            try:
                out.append(self._d.decompress(payload, max_length=size))  # bounded by the chunk
            except (lzma.LZMAError, EOFError) as e:
                raise FormatError(f"bad xz data: {e}") from None
        return out


@register_codec("xz")
class XzCodec(_StreamCodec):
    """xz / LZMA2 (liblzma): one raw LZMA2 stream across the file, a sync flush per chunk."""

    version = 2
    description = "xz / LZMA2, preset 9 extreme by default"
    Config = XzConfig

    def open_encoder(self, progress=None) -> EncodeSession:
        return _XzEncoder(self.config.flags)

    def open_decoder(self, progress=None) -> DecodeSession:
        return _XzDecoder(self.config.flags)
