"""Public coding API: ``compress``/``decompress`` on bytes, and streaming variants."""

from __future__ import annotations

import io
import logging
import os
from typing import Any, BinaryIO

from toolkit.codecs import container
from toolkit.codecs.auto import Choice, choose_codec
from toolkit.codecs.registry import Codec, get_codec
from toolkit.errors import ConfigError, DependencyError, InputError, UnsupportedInputError
from toolkit.progress import Progress, reporter

logger = logging.getLogger(__name__)

__all__ = ["compress", "decompress", "compress_stream", "decompress_stream", "info",
           "make_codec", "choose_codec", "Choice"]

#: bytes of the input that ``--codec auto`` looks at.
AUTO_SAMPLE = 64 << 10


def make_codec(codec: str | Codec, settings: dict | None = None) -> Codec:
    """Build a named codec with its settings, typed values of its config's fields (a string where the field
    is an integer is a ConfigError, not parsed); ``auto`` is resolved by :func:`choose_codec` first."""
    if isinstance(codec, Codec):
        if settings:
            raise ConfigError("settings are given with a codec name, not an instance")
        return codec
    if codec == "auto":
        raise ConfigError("auto picks a codec per input: call choose_codec first")
    cls = get_codec(codec)
    return cls.from_settings(dict(settings or {}))


def _as_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, str):
        raise UnsupportedInputError(f"{what} takes bytes, not str: encode the text first (text.encode('utf-8'))")
    try:
        return bytes(memoryview(data))
    except TypeError:
        raise UnsupportedInputError(f"{what} takes bytes, not {type(data).__name__}") from None


def compress(data: bytes, codec: str | Codec = "auto", best: bool = False, **settings: Any) -> bytes:
    """Compress ``data`` into a complete .tkz file (bytes).

    ``best``: with ``auto``, let the slow lm codec compete on text of any length.
    ``settings``: the codec's config fields as typed values (``orders=(1, 2)``, ``kbps=6``); strings are
    parsed only on the command line (``--set``).
    """
    data = _as_bytes(data, "compress")
    out = io.BytesIO()
    compress_stream(io.BytesIO(data), out, codec=codec, settings=settings, size=len(data), best=best)
    return out.getvalue()


def decompress(blob: bytes, allow_mismatch: bool = False, **local: Any) -> bytes:
    """Decode a .tkz file (bytes) back to the original bytes.

    ``local``: decode-time settings such as ``model_dir``; ``allow_mismatch``
    decodes a file recorded in another environment (the SHA-256 check decides).
    """
    out = io.BytesIO()
    container.read_stream(io.BytesIO(_as_bytes(blob, "decompress")), out, local={k: str(v) for k, v in local.items()},
                          allow_mismatch=allow_mismatch)
    return out.getvalue()


class _BytesDone:
    """The container's per-piece byte counts summed into ``progress(done, total)`` (total 0: not known)."""

    def __init__(self, progress: Progress, total: int | None, desc: str) -> None:
        self.report = reporter(progress, total or 0, desc)
        self.total, self.done = total or 0, 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.report(self.done, self.total)

    def finish(self) -> None:
        """The work is over, so its total is what was done (a bar closes)."""
        self.report(self.done, self.done)


def compress_stream(
    src: BinaryIO,
    dst: BinaryIO,
    codec: str | Codec = "auto",
    settings: dict | None = None,
    size: int | None = None,
    progress: Progress = False,
    best: bool = False,
) -> dict:
    """Stream ``src`` into a .tkz stream on ``dst`` in bounded memory; returns a summary.

    With ``auto`` the summary also holds ``auto`` (the reason) and ``hint``.
    ``progress``: True for a bar on stderr, or ``progress(bytes done, size or 0)``.
    """
    counter = _BytesDone(progress, size, "compress")
    summary = _compress_stream(src, dst, codec, settings, size, counter, best)
    counter.finish()
    return summary


def _compress_stream(src: BinaryIO, dst: BinaryIO, codec: str | Codec, settings: dict | None, size: int | None,
                     progress: _BytesDone, best: bool) -> dict:
    if codec != "auto":
        if best:
            raise ConfigError("best is for codec='auto' (it lets lm compete on long text)")
        return container.write_stream(make_codec(codec, settings), src, dst, size=size, progress=progress)
    if settings:
        raise ConfigError("--set needs an explicit --codec (auto picks per input)")
    head = container.read_full(src, AUTO_SAMPLE)
    if size is None and len(head) < AUTO_SAMPLE:
        size = len(head)  # the sample is the whole input
    choice = choose_codec(head, size=size, best=best)
    logger.info("auto: %s (%s)", choice.codec, choice.reason)
    src = container.Prefixed(head, src)
    if choice.fallback:
        summary = _whole_or_fallback(choice, src, dst, size, progress)
    else:
        summary = container.write_stream(make_codec(choice.codec), src, dst, size=size, progress=progress)
    return {**summary, "auto": choice.reason, "hint": choice.hint}


def _whole_or_fallback(choice: Choice, src: BinaryIO, dst: BinaryIO, size: int | None,
                       progress: _BytesDone) -> dict:
    """Code with ``choice.codec`` (a whole-file codec); where it refuses the input, with the fallback."""
    data = container.read_full(src, container.MAX_CHUNK + 1)
    out = io.BytesIO()
    try:
        summary = container.write_stream(make_codec(choice.codec), io.BytesIO(data), out, size=size)
    except (UnsupportedInputError, DependencyError) as e:
        logger.info("auto: %s refused the input (%s); using %s", choice.codec, e, choice.fallback)
        choice.reason += f"; {choice.codec} refused it ({e}), so {choice.fallback}"
        rest = container.Prefixed(data, src)
        return container.write_stream(make_codec(choice.fallback), rest, dst, size=size, progress=progress)
    dst.write(out.getvalue())
    progress(len(data))
    return summary


def decompress_stream(src: BinaryIO, dst: BinaryIO, progress: Progress = False,
                      settings: dict | None = None, allow_mismatch: bool = False) -> dict:
    """Decode a .tkz stream from ``src`` onto ``dst``; returns the header.

    ``settings``: decode-time settings such as ``model_dir``; ``progress``: True for a bar on
    stderr, or ``progress(bytes written, 0)`` (the total is known only at the end).
    """
    local = {k: str(v) for k, v in (settings or {}).items()}
    counter = _BytesDone(progress, None, "decompress")
    header = container.read_stream(src, dst, progress=counter, local=local, allow_mismatch=allow_mismatch)
    counter.finish()
    return header


def info(file: bytes | str | os.PathLike | BinaryIO) -> dict:
    """Header and framing summary of a .tkz file without decoding it: bytes, a path or an open stream."""
    if isinstance(file, str | os.PathLike):
        try:
            with open(file, "rb") as f:
                return container.read_info(f).as_dict()
        except FileNotFoundError:
            raise InputError(f"{os.fspath(file)}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{os.fspath(file)}: is a directory") from None
    if isinstance(file, bytes | bytearray | memoryview):
        return container.read_info(io.BytesIO(bytes(file))).as_dict()
    if not hasattr(file, "read"):
        raise UnsupportedInputError(f"info takes .tkz bytes, a path or a binary stream, not {type(file).__name__}")
    return container.read_info(file).as_dict()
