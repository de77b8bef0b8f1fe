"""``.npy`` files of ``uint8`` records: the header parsed without unpickling, and the exact file rebuilt.

A ``.npy`` file is a magic, a version, a length-prefixed Python-literal
header (``descr``, ``fortran_order``, ``shape``) padded to 16 or 64 bytes,
then the array's bytes. The header is parsed with :mod:`numpy.lib.format`
(a literal, never a pickle) and kept verbatim by whoever needs the exact
file back: :func:`rebuild_npy` writes that header followed by the records
in its order, so the bytes are the original's.

Every size here is a Python int (:func:`math.prod`), so a forged shape
cannot wrap around to a small number and pass a length check.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from toolkit.errors import UnsupportedInputError

__all__ = ["NPY_MAGIC", "NpyHeader", "read_npy_header", "check_uint8_records", "npy_records", "rebuild_npy"]

NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: its own length in bytes, the array's shape, order and dtype."""

    length: int
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype

    @property
    def data_bytes(self) -> int:
        """Bytes of array data the header promises (exact, however large the shape)."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def records(self) -> int:
        """Records of an array ``[N, ...]``: its first dimension."""
        return self.shape[0]

    @property
    def record_width(self) -> int:
        """Values per record: the product of the dimensions after the first."""
        return math.prod(self.shape[1:])


def read_npy_header(data: bytes) -> NpyHeader:
    """Parse the header at the start of ``data``; :class:`UnsupportedInputError` if it is not one."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except Exception as exc:  # numpy's literal parser (ast, then tokenize for old headers) raises many types
        raise UnsupportedInputError(f"bad .npy header: {exc}") from None
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise UnsupportedInputError(f"bad .npy header: negative dimension in shape {shape}")
    return NpyHeader(f.tell(), shape, bool(fortran), np.dtype(dtype))


def check_uint8_records(header: NpyHeader) -> None:
    """Refuse headers that are not ``uint8`` records ``[N, D, ...]``."""
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
