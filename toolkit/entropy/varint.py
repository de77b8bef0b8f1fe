"""LEB128 varints: the counts and lengths inside codec payloads."""

from __future__ import annotations

from toolkit.errors import FormatError

__all__ = ["varint", "read_varint"]


def varint(n: int) -> bytes:
    """``n >= 0`` as little-endian base-128 groups, the high bit set on all but the last."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: bytes, what: str = "varint") -> tuple[int, int]:
    """``(value, bytes used)`` of the varint at the start of ``buf``; ``what`` names it in the error."""
    n = shift = 0
    for i, b in enumerate(buf[:10]):
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i + 1
        shift += 7
    raise FormatError(f"truncated or overlong {what}")
