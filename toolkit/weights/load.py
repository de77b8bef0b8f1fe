"""Coded weights into models: decode a .tkz checkpoint at load time, or keep weights coded in memory.

:func:`load_state_dict` decodes a ``.tkz`` written by the ``weights`` codec
from a safetensors file (or a tar of shards) and returns its tensors, as
``safetensors.torch.load_file`` would, bit for bit. The decoded file is one
buffer and the tensors are views of it, so the weights are held once.

:func:`compress_in_memory` is the DFloat11 idea ("70% Size, 100% Accuracy",
Zhang et al. 2025) on this project's coder: each layer's float weights are
coded with :func:`~toolkit.weights.encode_segment` and the dense tensors
dropped. A forward pre-hook decodes a layer's weights just before it runs
and a forward hook frees them after, so at most one layer is dense at a
time and the outputs are bit-identical to the dense model's. The price is
the decoding inside every forward, which :class:`CodedModel` lets you
measure. The hooks make the model inference-only (weights decoded this way
have no gradients).
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
import torch

from toolkit.errors import ConfigError, UnsupportedInputError
from toolkit.weights.checkpoint import parse_header, row_length
from toolkit.weights.coding import LEVELS, SegmentShape, decode_segment, encode_segment, parallel_map

__all__ = ["load_state_dict", "compress_in_memory", "CodedModel", "CodedTensor"]

_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_SAFETENSORS = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
                "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
                "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, **_TORCH}
_NAMES = {v: k for k, v in _TORCH.items()}
#: values per coded segment in memory: segments of one tensor decode on all cores
_SEGMENT = 1 << 20


# ------------------------------------------------------------------ load_state_dict
def _tensors(buf: memoryview, base: int, size: int, device: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file at ``buf[base:base + size]``, as views where they stay on the CPU."""
    head = bytes(buf[base:base + min(size, 8 + int.from_bytes(bytes(buf[base:base + 8]), "little"))])
    header = parse_header(head, size)
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


def load_state_dict(file: str | os.PathLike | bytes, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a coded checkpoint (``codec compress model.safetensors`` or a directory of shards).

    ``file``: a ``.tkz`` path or its bytes. Tensors come back as the
    safetensors file held them (names, dtypes, shapes, every bit); the shards
    of a tar archive are merged, and a name found in two shards is an error.
    """
    import toolkit

    blob = bytes(file) if isinstance(file, bytes | bytearray | memoryview) else open(file, "rb").read()  # noqa: SIM115
    header = toolkit.info(blob)["header"]
    if header["codec"] != "weights":
        raise UnsupportedInputError(f"a .tkz of codec {header['codec']}, not a coded checkpoint (codec weights)")
    raw = io.BytesIO()
    toolkit.decompress_stream(io.BytesIO(blob), raw)
    buf = raw.getbuffer()
    device = str(device)
    if bytes(buf[257:262]) == b"ustar":
        out: dict[str, torch.Tensor] = {}
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".safetensors"):
                    for name, t in _tensors(buf, member.offset_data, member.size, device).items():
                        if name in out:
                            raise UnsupportedInputError(f"tensor {name!r} is in two shards")
                        out[name] = t
        if not out:
            raise UnsupportedInputError("the archive holds no .safetensors file")
        return out
    if bytes(buf[:6]) == b"\x93NUMPY":
        raise UnsupportedInputError("a coded .npy file: decompress it and read it with numpy.load")
    return _tensors(buf, 0, len(buf), device)


# ------------------------------------------------------------------ compress_in_memory
@dataclass
class CodedTensor:
    """One tensor's values as coded segments (each at most ``_SEGMENT`` values)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    segments: list[tuple[int, int, bytes]]  # (first value, count, payload)

    @property
    def coded_bytes(self) -> int:
        return sum(len(p) for _, _, p in self.segments)

    @property
    def dense_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()

    @classmethod
    def encode(cls, t: torch.Tensor, level: str) -> CodedTensor:
        name = _NAMES[t.dtype]
        flat = t.detach().reshape(-1).contiguous().cpu()
        raw = flat.view(torch.uint8).numpy()
        item = flat.element_size()
        row = row_length(tuple(t.shape))
        segments = []
        for v0 in range(0, flat.numel(), _SEGMENT):
            n = min(_SEGMENT, flat.numel() - v0)
            segments.append((v0, n, encode_segment(raw[v0 * item:(v0 + n) * item], name, SegmentShape(v0, row),
                                                   level=level)))
        return cls(t.dtype, tuple(t.shape), t.device, segments)

    def decode(self) -> torch.Tensor:
        name = _NAMES[self.dtype]
        numel = math.prod(self.shape)
        item = torch.empty(0, dtype=self.dtype).element_size()
        out = torch.empty(numel * item, dtype=torch.uint8)
        view = out.numpy()
        row = row_length(self.shape)

        def one(seg):
            v0, n, payload = seg
            view[v0 * item:(v0 + n) * item] = decode_segment(payload, name, SegmentShape(v0, row), n).view(np.uint8)

        parallel_map(one, self.segments)
        return out.view(self.dtype).reshape(self.shape).to(self.device)


@dataclass
class CodedModel:
    """What :func:`compress_in_memory` did to a model, and the handle to undo it."""

    model: torch.nn.Module
    coded: dict[int, CodedTensor]  # by id of the original parameter (tied weights coded once)
    owners: list[tuple[torch.nn.Module, str, int]]  # (module, parameter name, coded key)
    handles: list = field(default_factory=list)
    #: the most weight bytes held dense at once during a forward, measured by the hooks
    peak_dense_bytes: int = 0
    _live: int = 0

    @property
    def coded_bytes(self) -> int:
        return sum(c.coded_bytes for c in self.coded.values())

    @property
    def dense_bytes(self) -> int:
        return sum(c.dense_bytes for c in self.coded.values())

    def restore(self) -> None:
        """Decode every weight back into the model for good and remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module, name, key in self.owners:
            module._parameters[name] = torch.nn.Parameter(self.coded[key].decode(), requires_grad=False)
            module._toolkit_coded = False


def _placeholder(c: CodedTensor) -> torch.nn.Parameter:
    """An empty parameter of the right dtype and device (``model.dtype`` and ``.device`` still work)."""
    return torch.nn.Parameter(torch.empty(0, dtype=c.dtype, device=c.device), requires_grad=False)


def compress_in_memory(model: torch.nn.Module, level: str = "max", min_values: int = 4096) -> CodedModel:
    """Keep ``model``'s float weights coded, each decoded just before its layer runs (see the module docstring).

    Parameters with at least ``min_values`` values are coded (smaller ones,
    such as norms and biases, stay dense: their tables would cost more than
    they save). Returns the :class:`CodedModel` handle; ``restore()`` undoes it.
    """
    if level not in LEVELS:
        raise ConfigError(f"weights level must be one of {LEVELS}, got {level!r}")
    if any(getattr(m, "_toolkit_coded", False) for m in model.modules()):
        raise ConfigError("the model's weights are already coded in memory")
    coded: dict[int, CodedTensor] = {}
    owners: list[tuple[torch.nn.Module, str, int]] = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype not in _NAMES or p.numel() < min_values:
                continue
            if id(p) not in coded:
                coded[id(p)] = CodedTensor.encode(p, level)
            owners.append((module, name, id(p)))
    handle = CodedModel(model, coded, owners)
    by_module: dict[int, list[tuple[str, int]]] = {}
    modules: dict[int, torch.nn.Module] = {}
    for module, name, key in owners:
        by_module.setdefault(id(module), []).append((name, key))
        modules[id(module)] = module
    for mid, params in by_module.items():
        module = modules[mid]
        for name, key in params:
            module._parameters[name] = _placeholder(coded[key])
        module._toolkit_coded = True

        def before(mod, args, params=params):
            for name, key in params:
                mod._parameters[name] = torch.nn.Parameter(coded[key].decode(), requires_grad=False)
                handle._live += coded[key].dense_bytes
            handle.peak_dense_bytes = max(handle.peak_dense_bytes, handle._live)

        def after(mod, args, output, params=params):
            for name, key in params:
                mod._parameters[name] = _placeholder(coded[key])
                handle._live -= coded[key].dense_bytes

        handle.handles.append(module.register_forward_pre_hook(before))
        handle.handles.append(module.register_forward_hook(after, always_call=True))
    return handle
