"""``.npy`` files: the header parsed without unpickling, ``uint8`` records, and the exact file rebuilt.

A ``.npy`` file is a magic, a version (1 to 3), a header length (u16 in
version 1, u32 after), a Python-literal header (``descr``, ``fortran_order``,
``shape``) padded to 16 or 64 bytes, then the array's bytes. This is the one
parser of that header: the literal is read with :func:`ast.literal_eval`
(never a pickle, never numpy's reader, which may unpickle) and checked field
by field; :func:`header_size` tells a reader that sees the file in pieces
how many bytes the header takes. Whoever needs the exact file back keeps the
header bytes verbatim: :func:`rebuild_npy` writes them followed by the
records in their order, so the bytes are the original's.

Every size here is a Python int (:func:`math.prod`), so a forged shape
cannot wrap around to a small number and pass a length check.
"""

from __future__ import annotations

import ast
import math
import struct
from dataclasses import dataclass

import numpy as np

from toolkit.errors import UnsupportedInputError

__all__ = ["NPY_MAGIC", "MAX_HEADER_BYTES", "NpyHeader", "header_size", "read_npy_header", "check_uint8_records",
           "npy_records", "rebuild_npy"]

NPY_MAGIC = b"\x93NUMPY"
#: the longest header text read (numpy writes a few hundred bytes; a structured dtype may take more)
MAX_HEADER_BYTES = 100_000_000
_FIXED = 12  # magic, version and a version-2 length: enough to tell any header's size


def _bad(why: str) -> UnsupportedInputError:
    return UnsupportedInputError(f"invalid .npy file: {why}")


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: its own length in bytes, the array's shape, order and dtype.

    ``descr`` is the dtype as the header writes it; ``dtype`` is None for a
    structured dtype (a list of fields), whose layout nothing here reads.
    """

    length: int
    shape: tuple[int, ...]
    fortran: bool
    descr: object
    dtype: np.dtype | None

    @property
    def data_bytes(self) -> int:
        """Bytes of array data the header promises (exact, however large the shape)."""
        if self.dtype is None:
            raise UnsupportedInputError("a structured .npy dtype has no size read here")
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def records(self) -> int:
        """Records of an array ``[N, ...]``: its first dimension."""
        return self.shape[0]

    @property
    def record_width(self) -> int:
        """Values per record: the product of the dimensions after the first."""
        return math.prod(self.shape[1:])


def header_size(head: bytes) -> int:
    """Bytes that the header of a file starting with ``head`` takes, as far as ``head`` tells.

    Until its fixed part (magic, version, length) is in ``head`` this is the
    size of that part; a reader with fewer bytes than this reads on, or, at the
    end of its file, lets :func:`read_npy_header` say what is wrong.
    """
    if len(head) < 10:
        return _FIXED
    major = head[6]
    if major not in (1, 2, 3):
        raise _bad(f"unknown version {major}")
    fixed = 10 if major == 1 else 12
    if len(head) < fixed:
        return fixed
    n = struct.unpack("<H" if major == 1 else "<I", head[8:fixed])[0]
    if n > MAX_HEADER_BYTES:
        raise _bad(f"a header of {n:,} bytes")
    return fixed + n


def read_npy_header(data: bytes) -> NpyHeader:
    """Parse the header at the start of ``data``; :class:`UnsupportedInputError` if it is not one."""
    if not data.startswith(NPY_MAGIC):
        raise _bad("no .npy magic")
    if len(data) < 10:
        raise _bad("it ends inside its header")
    need = header_size(data)
    if len(data) < need:
        raise _bad("it ends inside its header")
    major = data[6]
    fixed = 10 if major == 1 else 12
    try:
        doc = ast.literal_eval(data[fixed:need].decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        raise _bad("its header is not a Python literal") from None
    if not isinstance(doc, dict) or set(doc) != {"descr", "fortran_order", "shape"}:
        raise _bad("its header needs exactly descr, fortran_order and shape")
    shape, descr, fortran = doc["shape"], doc["descr"], doc["fortran_order"]
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                             for d in shape)) or not isinstance(fortran, bool):
        raise _bad(f"shape {shape!r} / fortran_order {fortran!r}")
    dtype = None
    if isinstance(descr, str):
        try:
            dtype = np.dtype(descr)
        except (TypeError, ValueError):
            raise _bad(f"unknown dtype {descr!r}") from None
    return NpyHeader(need, shape, fortran, descr, dtype)


def check_uint8_records(header: NpyHeader) -> None:
    """Refuse headers that are not ``uint8`` records ``[N, D, ...]``."""
    if header.dtype is None:
        raise UnsupportedInputError(f"expected uint8 records; this .npy holds the structured dtype {header.descr!r}")
    if header.dtype.hasobject:
        raise UnsupportedInputError(".npy holds Python objects (a pickle); it is never unpickled here")
    if header.dtype != np.uint8:
        raise UnsupportedInputError(f"expected uint8 records; this .npy holds {header.dtype}")
    if len(header.shape) < 2:
        raise UnsupportedInputError(f"expected records [N, D] or [N, H, W]; this .npy has shape {header.shape}")


def npy_records(data: bytes, width: int | None = None) -> tuple[NpyHeader, np.ndarray]:
    """The header and ``uint8 [N, D]`` records (each record's values in C order) of a ``.npy`` file.

    ``width``, when given, is the number of values per record the caller can
    code; it is checked against the header before any array is made.
    """
    header = read_npy_header(data)
    check_uint8_records(header)
    if width is not None and header.record_width != width:
        raise UnsupportedInputError(f"records of shape {header.shape[1:]} hold {header.record_width} values, "
                                    f"not the {width} expected")
    have = len(data) - header.length
    if have != header.data_bytes:
        raise UnsupportedInputError(f".npy holds {have} data bytes, its shape {header.shape} needs {header.data_bytes}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header.length).reshape(
        header.shape, order="F" if header.fortran else "C")
    return header, np.ascontiguousarray(arr).reshape(header.records, header.record_width)


def rebuild_npy(head: bytes, header: NpyHeader, records: np.ndarray) -> bytes:
    """The exact file: ``head`` (the original header bytes, parsed as ``header``) and the records in its order."""
    arr = records.astype(np.uint8, copy=False).reshape(header.shape)
    return head + arr.tobytes(order="F" if header.fortran else "C")
