"""safetensors headers, read and checked before anything is allocated.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`` with
an optional ``"__metadata__"`` of strings), then the tensors' bytes; offsets
count from the end of the header. This module parses only the header (the
safetensors library reads whole files or maps them, which a streaming coder
cannot use) and refuses what that library would refuse: offsets out of
range, overlapping tensors, holes between them, sizes that disagree with
dtype and shape, unknown dtypes, and JSON that is not an object of such
entries. The tensors are returned in file order, with the byte range of each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from toolkit.errors import UnsupportedInputError
from toolkit.formats.safetensors import LENGTH_BYTES, header_json

__all__ = ["DTYPE_BYTES", "FLOAT_DTYPES", "row_length", "TensorEntry", "SafetensorsHeader", "parse_header"]

#: bytes per element of every safetensors dtype this codec takes (sub-byte types are refused)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
#: the dtypes coded as floats; the others (integers, bools, 8-bit floats) go to zstd
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def row_length(shape: tuple[int, ...]) -> int:
    """Values per row of a tensor read as a matrix of ``shape[0]`` rows (a vector is one row)."""
    return max(1, math.prod(shape[1:])) if len(shape) >= 2 else max(1, math.prod(shape))


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row(self) -> int:
        """Values per row when the tensor is read as a matrix (``shape[0]`` rows)."""
        return row_length(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    size: int  # bytes of length prefix + JSON: where the data starts
    tensors: tuple[TensorEntry, ...]  # in file order
    metadata: dict

    @property
    def data_end(self) -> int:
        return self.tensors[-1].end if self.tensors else self.size


def _bad(why: str) -> UnsupportedInputError:
    return UnsupportedInputError(f"invalid safetensors header: {why}")


def parse_header(head: bytes | memoryview, file_size: int | None = None) -> SafetensorsHeader:
    """Parse the length prefix and JSON at the start of ``head`` (which must hold both).

    ``file_size`` (None where unknown, as on a pipe) must then equal the end of
    the last tensor; the streaming coder checks the end itself.
    """
    raw = header_json(head, file_size)
    if raw[:1] != b"{":
        raise UnsupportedInputError("not a safetensors file: the header is not a JSON object")
    try:
        doc = json.loads(str(raw, "utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _bad("not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _bad("__metadata__ must map strings to strings")
    start = LENGTH_BYTES + len(raw)
    entries = []
    for name, info in doc.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise _bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise _bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype} {shape} ({nbytes} expected)")
        entries.append(TensorEntry(name, dtype, tuple(shape), start + offsets[0], start + offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = start
    for e in entries:
        if e.begin < pos:
            raise _bad(f"tensor {e.name!r} overlaps the one before it")
        if e.begin > pos:
            raise _bad(f"a gap of {e.begin - pos} bytes before tensor {e.name!r}")
        pos = e.end
    if file_size is not None and pos != file_size:
        raise _bad(f"the tensors end at byte {pos:,} but the file has {file_size:,}")
    return SafetensorsHeader(start, tuple(entries), metadata)
