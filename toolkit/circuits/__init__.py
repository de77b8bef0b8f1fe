"""Probabilistic circuits: HCLT structures, compiled tensor circuits, EM, and the PC coder.

Implements the circuits of "Lossless Compression with Probabilistic Circuits"
(Liu, Mandt, Van den Broeck, ICLR 2022) on plain PyTorch: learn a hidden
Chow-Liu tree (:func:`learn_hclt`), compile it (:class:`Circuit`), train it
(:func:`fit_em`; :func:`fit_hclt` does both steps), query it (marginals, conditionals, samples) and code
records with it (:func:`encode_records` / :func:`decode_records`). Images become
records through :mod:`toolkit.circuits.images` (patch models); reading and
rebuilding image files is :mod:`toolkit.formats`.

Names resolve on first use, so importing this package (or its torch-free
:mod:`toolkit.circuits.settings`, which a codec's config checks) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "METHODS": "toolkit.circuits.settings",
    "MAX_BATCH": "toolkit.circuits.settings",
    "Circuit": "toolkit.circuits.circuit",
    "decode_records": "toolkit.circuits.coder",
    "encode_records": "toolkit.circuits.coder",
    "model_bits": "toolkit.circuits.coder",
    "EMConfig": "toolkit.circuits.em",
    "expected_flows": "toolkit.circuits.em",
    "fit_em": "toolkit.circuits.em",
    "mean_log_likelihood": "toolkit.circuits.em",
    "PatchModel": "toolkit.circuits.images",
    "image_to_records": "toolkit.circuits.images",
    "records_to_image": "toolkit.circuits.images",
    "train_patch_model": "toolkit.circuits.images",
    "TreeStructure": "toolkit.circuits.structure",
    "chow_liu_tree": "toolkit.circuits.structure",
    "learn_hclt": "toolkit.circuits.structure",
    "pairwise_mutual_information": "toolkit.circuits.structure",
    "random_tree": "toolkit.circuits.structure",
    "circuit_sha256": "toolkit.circuits.train",
    "fit_hclt": "toolkit.circuits.train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit.circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
