"""One-call training of an HCLT circuit, and the hash that names a circuit in .tkz headers.

:func:`fit_hclt` is the public "learn a structure, then run EM" verb:
``circuit, history = fit_hclt(train, EMConfig(epochs=20), num_latents=16, valid=held_out)``.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.em import EMConfig, fit_em
from toolkit.circuits.structure import learn_hclt
from toolkit.errors import ConfigError, UnsupportedInputError
from toolkit.progress import Progress

__all__ = ["fit_hclt", "circuit_sha256"]

log = logging.getLogger(__name__)


def fit_hclt(
    data: np.ndarray | torch.Tensor,
    config: EMConfig | None = None,
    *,
    num_latents: int = 16,
    num_cats: int | None = None,
    valid: np.ndarray | torch.Tensor | None = None,
    mi_bins: int | None = None,
    progress: Progress = False,
) -> tuple[Circuit, list[dict]]:
    """Learn an HCLT on ``data[N, ...]`` (integer codes, e.g. uint8) and train it with EM under ``config``.

    Records of more than two dimensions (``[N, H, W]`` images) are flattened
    row-major. ``num_cats`` defaults to ``max(data) + 1`` (at least 2); pass it
    when held-out or future records may use values the training set lacks,
    e.g. 256 for bytes. ``config.seed`` seeds the initial parameters as well
    as the batch order. Returns the circuit and the per-epoch history of
    :func:`~toolkit.circuits.em.fit_em` (train and, with ``valid``, held-out
    bits per dimension).
    """
    cfg = config if config is not None else EMConfig()
    if not isinstance(cfg, EMConfig):
        raise ConfigError(f"config must be an EMConfig, got {type(cfg).__name__}")
    x = np.asarray(data.cpu() if isinstance(data, torch.Tensor) else data)
    if x.ndim < 2 or x.shape[0] < 1:
        raise UnsupportedInputError(f"data must be [records, ...] with at least one record, got {x.shape}")
    if x.dtype.kind not in "ui" or (x.size and x.min() < 0):
        raise UnsupportedInputError("data must hold non-negative integer codes")
    x = x.reshape(x.shape[0], -1).astype(np.int64)
    k = int(num_cats) if num_cats is not None else max(2, int(x.max()) + 1)
    if k < 2 or int(x.max()) >= k:
        raise ConfigError(f"num_cats={k} does not cover the data's values (max {int(x.max())})")
    v = None
    if valid is not None:
        v = np.asarray(valid.cpu() if isinstance(valid, torch.Tensor) else valid)
        v = v.reshape(v.shape[0], -1).astype(np.int64)
    structure = learn_hclt(x, num_cats=k, num_latents=num_latents, mi_bins=mi_bins)
    circuit = Circuit(structure, seed=cfg.seed)
    history = fit_em(circuit, cfg, x, valid=v, progress=progress)
    return circuit, history


def circuit_sha256(circuit: Circuit) -> str:
    """SHA-256 over a circuit's structure and parameters (what a .tkz header records).

    Hashes the tensors' float32 bytes rather than a file, so a circuit has
    the same name in memory, saved, and loaded again.
    """
    h = hashlib.sha256(circuit.structure.to_json().encode())
    for name in ("leaf_logp", "edge_logw", "root_logw"):
        t = getattr(circuit, name).detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
