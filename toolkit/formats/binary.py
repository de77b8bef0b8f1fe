"""The one bounded reader of bytes from a file: every count is checked before it is used.

Every parser of the toolkit's own payloads (weights segments, KV bitstreams,
audio frames, entropy tables) reads through :class:`ByteReader`. A varint
is read only with the largest value the caller can accept, and a length only
against the bytes that are left, so a forged count becomes one
:class:`~toolkit.errors.FormatError` naming ``what`` was being read, never an
allocation of what the file asks for.
"""

from __future__ import annotations

import struct

from toolkit.entropy.varint import read_varint, varint
from toolkit.errors import FormatError

__all__ = ["ByteReader", "varint"]


class ByteReader:
    """Reads ``data`` front to back; ``what`` names the structure in every error."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str, pos: int = 0) -> None:
        self.view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        self.what = what
        if not 0 <= pos <= len(self.view):
            raise FormatError(f"{what}: start {pos} is outside its {len(self.view)} bytes")
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self.view) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.view):
            raise FormatError(f"{self.what}: truncated")
        self.pos += 1
        return self.view[self.pos - 1]

    def u32(self) -> int:
        """A little-endian unsigned 32-bit integer."""
        (value,) = struct.unpack("<I", self.take(4))
        return value

    def varint(self, limit: int) -> int:
        """A LEB128 count, refused above ``limit`` (the most the caller can use)."""
        value, used = read_varint(self.view[self.pos:self.pos + 10], self.what)
        if self.pos + used > len(self.view):
            raise FormatError(f"{self.what}: truncated")
        self.pos += used
        if value > limit:
            raise FormatError(f"{self.what}: a count of {value:,} where at most {limit:,} fit")
        return value

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (a view, not a copy)."""
        if n < 0 or n > self.remaining:
            raise FormatError(f"{self.what}: truncated")
        self.pos += n
        return self.view[self.pos - n:self.pos]

    def blob(self, limit: int | None = None) -> memoryview:
        """A varint length then that many bytes; a length over ``limit`` (or the whole buffer) is refused as
        a count that cannot fit, one over what is left as truncated."""
        return self.take(self.varint(len(self.view) if limit is None else limit))

    def done(self) -> None:
        """Refuse trailing bytes: a parser that stops early has read a different structure."""
        if self.pos != len(self.view):
            raise FormatError(f"{self.what}: {self.remaining:,} trailing bytes")
