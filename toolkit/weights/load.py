"""The tensors of a checkpoint held in memory, as views of its bytes.

:func:`read_checkpoint` takes the bytes of a safetensors file, or of a tar
archive of shards (what the ``weights`` codec decodes a ``.tkz`` back to), and
returns its tensors as ``safetensors.torch.load_file`` would, bit for bit.
The tensors that stay on the CPU are views of that one buffer, so the weights
are held once. Reading the ``.tkz`` file itself is the codec's part
(:func:`toolkit.codecs.weights.load_state_dict`).
"""

from __future__ import annotations

import torch

from toolkit.errors import UnsupportedInputError
from toolkit.formats import npy, tar
from toolkit.weights.checkpoint import parse_header

__all__ = ["read_checkpoint"]

_SAFETENSORS = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
                "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
                "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16,
                "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _tensors(buf: memoryview, base: int, size: int, device: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``buf[base:base + size]``, as views where they stay on the CPU."""
    header = parse_header(buf[base:base + size], size)
    out = {}
    for t in header.tensors:
        dtype = _SAFETENSORS.get(t.dtype)
        if dtype is None:
            raise UnsupportedInputError(f"tensor {t.name!r}: dtype {t.dtype} has no torch type")
        if t.end == t.begin:
            out[t.name] = torch.empty(t.shape, dtype=dtype, device=device)
            continue
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=t.end - t.begin, offset=base + t.begin)
        out[t.name] = flat.view(dtype).reshape(t.shape).to(device)
    return out


def read_checkpoint(data: bytes | bytearray | memoryview,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of the shards in a tar archive, held in ``data``.

    Tensors come back as the safetensors file held them (names, dtypes,
    shapes, every bit); the shards of an archive are merged, and a name found
    in two shards is an error. Tensors on the CPU are views of ``data`` where
    it is writable (a ``bytearray``); read-only bytes are copied once first,
    since torch's tensors are writable.
    """
    buf = memoryview(data)
    if buf.readonly:
        buf = memoryview(bytearray(buf))
    device = str(device)
    if tar.is_tar(buf):
        out: dict[str, torch.Tensor] = {}
        for name, offset, size in tar.files(buf):
            if name.endswith(".safetensors"):
                for key, t in _tensors(buf, offset, size, device).items():
                    if key in out:
                        raise UnsupportedInputError(f"tensor {key!r} is in two shards")
                    out[key] = t
        if not out:
            raise UnsupportedInputError("the archive holds no .safetensors file")
        return out
    if bytes(buf[:len(npy.NPY_MAGIC)]) == npy.NPY_MAGIC:
        raise UnsupportedInputError("a coded .npy file: decompress it and read it with numpy.load")
    return _tensors(buf, 0, len(buf), device)
