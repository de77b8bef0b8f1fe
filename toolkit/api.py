"""Public coding API: ``compress``/``decompress`` on bytes, and streaming variants."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any, BinaryIO

from toolkit.codecs import container
from toolkit.codecs.registry import Codec, get_codec, list_codecs
from toolkit.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["compress", "decompress", "compress_stream", "decompress_stream", "info",
           "make_codec", "choose_codec"]

#: bytes of the input that ``--codec auto`` looks at.
AUTO_SAMPLE = 64 << 10


def choose_codec(sample: bytes) -> str:
    """Name of the registered codec with the lowest estimated bits per byte on ``sample``."""
    best, best_bpb = "zstd", float("inf")
    for name, cls in list_codecs().items():
        try:
            bpb = cls.estimate_bpb(sample)
        except Exception as e:  # an optional codec (missing model) must not break auto
            logger.info("auto: %s skipped (%s)", name, e)
            continue
        logger.info("auto: %s estimates %s bits/byte", name, bpb)
        if bpb is not None and bpb < best_bpb:
            best, best_bpb = name, bpb
    return best


def make_codec(codec: str | Codec = "auto", sample: bytes = b"", settings: dict | None = None) -> Codec:
    """Build a codec from a name (``auto`` looks at ``sample``) and settings."""
    if isinstance(codec, Codec):
        if settings:
            raise ConfigError("settings are given with a codec name, not an instance")
        return codec
    name = choose_codec(sample) if codec == "auto" else codec
    if codec == "auto" and settings:
        raise ConfigError("--set needs an explicit --codec (auto picks per input)")
    cls = get_codec(name)
    return cls.from_settings({k: str(v) for k, v in (settings or {}).items()})


def compress(data: bytes, codec: str | Codec = "auto", **settings: Any) -> bytes:
    """Compress ``data`` into a complete .tkz file (bytes)."""
    data = bytes(data)
    c = make_codec(codec, data[:AUTO_SAMPLE], settings)
    out = io.BytesIO()
    container.write_stream(c, io.BytesIO(data), out, size=len(data))
    return out.getvalue()


def decompress(blob: bytes, allow_mismatch: bool = False, **local: Any) -> bytes:
    """Decode a .tkz file (bytes) back to the original bytes.

    ``local``: decode-time settings such as ``model_dir``; ``allow_mismatch``
    decodes a file recorded in another environment (the SHA-256 check decides).
    """
    out = io.BytesIO()
    container.read_stream(io.BytesIO(bytes(blob)), out, local={k: str(v) for k, v in local.items()},
                          allow_mismatch=allow_mismatch)
    return out.getvalue()


def compress_stream(
    src: BinaryIO,
    dst: BinaryIO,
    codec: str | Codec = "auto",
    settings: dict | None = None,
    size: int | None = None,
    progress: Callable[[int], None] | None = None,
    extra_header: dict | None = None,
) -> dict:
    """Stream ``src`` into a .tkz stream on ``dst`` in bounded memory; returns a summary."""
    head = b""
    if codec == "auto":
        head = src.read(AUTO_SAMPLE) or b""
        src = _Prefixed(head, src)
    c = make_codec(codec, head, settings)
    return container.write_stream(c, src, dst, size=size, extra_header=extra_header, progress=progress)


def decompress_stream(src: BinaryIO, dst: BinaryIO, progress: Callable[[int], None] | None = None,
                      settings: dict | None = None, allow_mismatch: bool = False) -> dict:
    """Decode a .tkz stream from ``src`` onto ``dst``; returns the header.

    ``settings``: decode-time settings such as ``model_dir``.
    """
    return container.read_stream(src, dst, progress=progress, local={k: str(v) for k, v in (settings or {}).items()},
                                 allow_mismatch=allow_mismatch)


def info(blob_or_stream: bytes | BinaryIO) -> dict:
    """Header and framing summary of a .tkz file without decoding it."""
    src = io.BytesIO(blob_or_stream) if isinstance(blob_or_stream, bytes | bytearray) else blob_or_stream
    return container.read_info(src).as_dict()


class _Prefixed(io.RawIOBase):
    """A stream that yields ``head`` and then the rest of ``tail`` (for sniffed stdin)."""

    def __init__(self, head: bytes, tail: BinaryIO):
        self.head, self.tail = head, tail

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.tail.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.tail.read(n)
