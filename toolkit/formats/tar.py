"""Tar archives: telling one from its first block, walking its headers, and writing a directory as one.

A tar archive is a run of 512-byte blocks: each member is a header block
(ustar: the magic ``ustar`` at byte 257, the size as octal digits or, for
large members, base-256) followed by its data padded to whole blocks; two
zero blocks end the archive. A pax extended header (kind ``x``) is a member
of ``"%d key=value\\n"`` records that applies to the member after it and may
give its real ``size``.

The weights codec reads archives of checkpoint shards as they stream past
(:func:`read_header` on each header block, :func:`pax_size` on a pax
member), :func:`files` lists the regular files of a decoded archive held in
memory, and :class:`DirectoryStream` writes a directory as an archive into a
pipe, so ``codec compress DIR`` codes a directory of shards without a copy on disk.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from toolkit.errors import InputError

__all__ = ["BLOCK", "TarHeader", "is_tar", "read_header", "pax_size", "files", "DirectoryStream"]

BLOCK = 512
_MAGIC = slice(257, 262)


def is_tar(head: bytes | memoryview) -> bool:
    """Whether ``head`` (the start of a file, or a header block) carries the ustar magic."""
    return bytes(head[_MAGIC]) == b"ustar"


@dataclass(frozen=True)
class TarHeader:
    """What a member's header block says: its kind (``b"0"`` a file, ``b"x"`` pax records, ...) and data size."""

    kind: bytes
    size: int

    @property
    def padded(self) -> int:
        """Bytes from the end of the header to the next header: the data rounded up to whole blocks."""
        return -(-self.size // BLOCK) * BLOCK


def read_header(block: bytes) -> TarHeader | None:
    """The header in a 512-byte ``block``, or None where it is none (an end-of-archive block, damage)."""
    if len(block) < BLOCK or not any(block) or not is_tar(block):
        return None
    size = _number(block[124:136])
    if size is None:
        return None
    return TarHeader(bytes(block[156:157]), size)


def _number(field: bytes) -> int | None:
    """A tar size field: octal digits, or base-256 when the top bit of its first byte is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def pax_size(records: bytes) -> int | None:
    """The ``size`` record of a pax extended header's data, if any."""
    pos = 0
    size = None
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                return None
        pos += length
    return size


def files(data: bytes | memoryview) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in the archive ``data``, in archive order.

    Names come from pax and GNU long-name records as well as the header, which
    the standard library's reader resolves.
    """
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for member in tf:
            if member.isfile():
                yield member.name, member.offset_data, member.size


class DirectoryStream:
    """A directory as a tar archive (pax format, entries sorted), written by a thread into a pipe.

    Read it like a file. A file the thread cannot read fails the read that
    reaches the end, so whoever consumes the stream publishes nothing.
    """

    def __init__(self, path: str | os.PathLike):
        self.error: BaseException | None = None
        r, w = os.pipe()
        self.reader = os.fdopen(r, "rb")

        def write() -> None:
            try:
                with os.fdopen(w, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                    tf.add(path, arcname=os.path.basename(os.path.normpath(path)))
            except BrokenPipeError:
                pass  # the reader stopped (an error on its side, reported there)
            except OSError as e:
                self.error = e

        self.thread = threading.Thread(target=write, daemon=True)
        self.thread.start()

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        if not data:  # the end: the archive is whole only if the thread finished cleanly
            self.thread.join()
            if self.error is not None:
                raise InputError(f"cannot archive the directory: {self.error}")
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.reader.close()
