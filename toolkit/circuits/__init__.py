"""Probabilistic circuits: HCLT structures, compiled tensor circuits, EM, and the PC coder.

Implements the circuits of "Lossless Compression with Probabilistic Circuits"
(Liu, Mandt, Van den Broeck, ICLR 2022) on plain PyTorch: learn a hidden
Chow-Liu tree (:func:`learn_hclt`), compile it (:class:`Circuit`), train it
(:func:`fit_em`; :func:`fit_hclt` does both steps), query it (marginals, conditionals, samples) and code
records with it (:func:`encode_records` / :func:`decode_records`).
"""

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.coder import METHODS, decode_records, encode_records, model_bits
from toolkit.circuits.em import EMConfig, expected_flows, fit_em, mean_log_likelihood
from toolkit.circuits.images import (
    PatchModel,
    encode_png,
    image_to_records,
    load_image_bytes,
    parse_png,
    records_to_image,
    train_patch_model,
)
from toolkit.circuits.structure import (
    TreeStructure,
    chow_liu_tree,
    learn_hclt,
    pairwise_mutual_information,
    random_tree,
)
from toolkit.circuits.train import circuit_sha256, fit_hclt

__all__ = [
    "METHODS",
    "Circuit",
    "EMConfig",
    "PatchModel",
    "TreeStructure",
    "chow_liu_tree",
    "circuit_sha256",
    "encode_png",
    "decode_records",
    "encode_records",
    "expected_flows",
    "fit_em",
    "fit_hclt",
    "image_to_records",
    "learn_hclt",
    "load_image_bytes",
    "mean_log_likelihood",
    "model_bits",
    "pairwise_mutual_information",
    "parse_png",
    "random_tree",
    "records_to_image",
    "train_patch_model",
]
