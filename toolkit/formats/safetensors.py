"""safetensors framing: the 8-byte header length and the JSON it frames, told apart and read bounded.

A safetensors file is an 8-byte little-endian length N, N bytes of JSON,
then the tensors' bytes. This is the one reader of that frame:
:func:`is_safetensors` tells a file from its first :data:`SNIFF_BYTES`
bytes (``codec auto`` and the weights scanner ask it), :func:`header_size`
reads N, checked against the safetensors library's limit and the file's
size, and :func:`header_json` gives the JSON once all of it is at hand.
What the JSON says is checked by :mod:`toolkit.weights.checkpoint`. These
are the user's input files, so a bad one is an
:class:`~toolkit.errors.UnsupportedInputError`, and every length is checked
before the reader is asked for the bytes.
"""

from __future__ import annotations

from toolkit.errors import UnsupportedInputError
from toolkit.formats.binary import ByteReader

__all__ = ["LENGTH_BYTES", "MAX_HEADER_BYTES", "SNIFF_BYTES", "header_json", "header_size", "is_safetensors"]

#: the header length's own bytes, where the JSON starts
LENGTH_BYTES = 8
#: the safetensors library's own limit on the JSON
MAX_HEADER_BYTES = 100_000_000
#: what :func:`is_safetensors` looks at: the length and the JSON's ``{``
SNIFF_BYTES = LENGTH_BYTES + 1
_WHAT = "safetensors header"


def _json_length(r: ByteReader, file_size: int | None) -> int:
    """N, read by ``r`` at the start of the file: at least ``{}``, at most the limit, within ``file_size``."""
    if r.remaining < LENGTH_BYTES:
        raise UnsupportedInputError("not a safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(r.take(LENGTH_BYTES), "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise UnsupportedInputError(f"not a safetensors file: header length {n} outside 2..{MAX_HEADER_BYTES:,}")
    if file_size is not None and LENGTH_BYTES + n > file_size:
        raise UnsupportedInputError(f"not a safetensors file: header of {n:,} bytes in a file of {file_size:,}")
    return n


def is_safetensors(head: bytes | memoryview) -> bool:
    """Whether a file starting with ``head`` looks like safetensors: a length within the limit, then ``{``."""
    if len(head) < SNIFF_BYTES:
        return False
    r = ByteReader(head, _WHAT)
    n = int.from_bytes(r.take(LENGTH_BYTES), "little")
    return 2 <= n <= MAX_HEADER_BYTES and r.u8() == ord("{")


def header_size(head: bytes | memoryview, file_size: int | None = None) -> int:
    """Bytes of the length and the JSON (where the tensors start), from the first 8 bytes of ``head``.

    ``file_size``, where known, must hold them.
    """
    return LENGTH_BYTES + _json_length(ByteReader(head, _WHAT), file_size)


def header_json(head: bytes | memoryview, file_size: int | None = None) -> memoryview:
    """The JSON of the safetensors file that starts with ``head``, which must hold all of it (a view)."""
    r = ByteReader(head, _WHAT)
    n = _json_length(r, file_size)
    if n > r.remaining:
        raise UnsupportedInputError("invalid safetensors header: truncated")
    return r.take(n)
