"""A model's weights kept coded in memory, each layer's decoded just before it runs (DFloat11-style).

:func:`compress_weights_` is the DFloat11 idea ("70% Size, 100% Accuracy",
Zhang et al. 2025) on this project's coder: each layer's float weights are
coded with :func:`~toolkit.weights.coding.encode_segment` and the dense
tensors dropped. A forward pre-hook decodes a layer's weights just before it
runs and a forward hook frees them after, so at most one layer is dense at a
time and the outputs are bit-identical to the dense model's. On a CUDA
device the context-coded segments decode there (:mod:`toolkit.weights.device`,
the rANS lanes in one Triton launch per tensor). The price is the decoding
inside every forward, which :class:`CodedModel` lets you measure. The hooks
make the model inference-only (weights decoded this way have no gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from toolkit.config import Config, check
from toolkit.errors import ConfigError
from toolkit.kernels.backend import triton_available
from toolkit.progress import Progress, reporter
from toolkit.weights.checkpoint import row_length
from toolkit.weights.coding import LEVELS, SegmentShape, decode_segment, encode_segment, parallel_map

__all__ = ["InMemoryConfig", "compress_weights_", "CodedModel", "CodedTensor"]

#: safetensors names of the float dtypes that are coded
_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}
#: values per coded segment in memory: segments of one tensor decode on all cores
_SEGMENT = 1 << 20


@dataclass(frozen=True)
class InMemoryConfig(Config):
    """Settings of :func:`compress_weights_`."""

    #: ``fast`` (zstd byte planes, the quickest to decode) or ``max`` (context-coded, the smallest)
    level: str = "max"
    #: parameters with fewer values stay dense: norms and biases, whose tables would cost more than they save
    min_values: int = 4096

    def __post_init__(self):
        check(self.level in LEVELS, f"weights level must be one of {LEVELS}, got {self.level!r}")
        check(self.min_values >= 1, f"min_values must be a positive integer, got {self.min_values!r}")


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
        """The tensor on its device: decoded there on a CUDA device, on all CPU cores otherwise."""
        if self.device.type == "cuda" and triton_available():
            from toolkit.weights.device import decode_on_device

            return decode_on_device(self.segments, _NAMES[self.dtype], self.shape, self.device)
        name = _NAMES[self.dtype]
        item = torch.empty(0, dtype=self.dtype).element_size()
        out = torch.empty(math.prod(self.shape) * item, dtype=torch.uint8)
        view = out.numpy()
        row = row_length(self.shape)

        def one(seg):
            v0, n, payload = seg
            view[v0 * item:(v0 + n) * item] = decode_segment(payload, name, SegmentShape(v0, row), n).view(np.uint8)

        parallel_map(one, self.segments)
        return out.view(self.dtype).reshape(self.shape).to(self.device)


@dataclass
class CodedModel:
    """What :func:`compress_weights_` did to a model, and the handle that undoes it (:meth:`remove`)."""

    model: torch.nn.Module
    coded: dict[int, CodedTensor]  # by id of the original parameter (tied weights coded once)
    owners: list[tuple[torch.nn.Module, str, int]]  # (module, parameter name, coded key)
    requires_grad: dict[int, bool] = field(default_factory=dict)  # each original parameter's, by coded key
    handles: list = field(default_factory=list)
    #: the most weight bytes held dense at once during a forward, measured by the hooks
    peak_dense_bytes: int = 0
    _live: int = 0
    _removed: bool = False

    @property
    def coded_bytes(self) -> int:
        return sum(c.coded_bytes for c in self.coded.values())

    @property
    def dense_bytes(self) -> int:
        return sum(c.dense_bytes for c in self.coded.values())

    def remove(self) -> None:
        """Decode every weight back into the model for good and remove the hooks; a second call does nothing.

        Each original parameter comes back as one parameter, shared again by every module that
        shared it (tied embeddings), with the ``requires_grad`` it had.
        """
        if self._removed:
            return
        self._removed = True
        for h in self.handles:
            h.remove()
        self.handles.clear()
        dense = {key: torch.nn.Parameter(c.decode(), requires_grad=self.requires_grad.get(key, False))
                 for key, c in self.coded.items()}
        for module, name, key in self.owners:
            module._parameters[name] = dense[key]
            module._toolkit_coded = False


def _placeholder(c: CodedTensor) -> torch.nn.Parameter:
    """An empty parameter of the right dtype and device (``model.dtype`` and ``.device`` still work)."""
    return torch.nn.Parameter(torch.empty(0, dtype=c.dtype, device=c.device), requires_grad=False)


def compress_weights_(model: torch.nn.Module, config: InMemoryConfig | None = None,
                      progress: Progress = False) -> CodedModel:
    """Keep ``model``'s float weights coded, each decoded just before its layer runs (see the module docstring).

    Parameters with at least ``config.min_values`` values are coded; the
    others stay dense. Returns the :class:`CodedModel` handle; ``remove()``
    puts the dense weights back. ``progress`` counts the parameters coded.
    """
    config = config if config is not None else InMemoryConfig()
    if not isinstance(config, InMemoryConfig):
        raise ConfigError(f"config must be an InMemoryConfig, got {type(config).__name__}")
    if any(getattr(m, "_toolkit_coded", False) for m in model.modules()):
        raise ConfigError("the model's weights are already coded in memory")
    found = [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
             if p.dtype in _NAMES and p.numel() >= config.min_values]
    report = reporter(progress, len(found), "coding weights")
    coded: dict[int, CodedTensor] = {}
    owners: list[tuple[torch.nn.Module, str, int]] = []
    grads: dict[int, bool] = {}
    for done, (module, name, p) in enumerate(found, 1):
        if id(p) not in coded:
            coded[id(p)] = CodedTensor.encode(p, config.level)
            grads[id(p)] = p.requires_grad
        owners.append((module, name, id(p)))
        report(done, len(found))
    handle = CodedModel(model, coded, owners, grads)
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
