"""Probabilistic circuits: HCLT structures, compiled tensor circuits, EM, and the PC coder.

Implements the circuits of "Lossless Compression with Probabilistic Circuits"
(Liu, Mandt, Van den Broeck, ICLR 2022) on plain PyTorch: learn a hidden
Chow-Liu tree (:func:`learn_hclt`), compile it (:class:`Circuit`), train it
(:func:`fit_em`), query it (marginals, conditionals, samples) and code
records with it (:func:`encode_records` / :func:`decode_records`).
"""

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.coder import METHODS, decode_records, encode_records, model_bits
from toolkit.circuits.em import EMConfig, expected_flows, fit_em, mean_log_likelihood
from toolkit.circuits.structure import (
    TreeStructure,
    chow_liu_tree,
    learn_hclt,
    pairwise_mutual_information,
    random_tree,
)

__all__ = [
    "METHODS",
    "Circuit",
    "EMConfig",
    "TreeStructure",
    "chow_liu_tree",
    "decode_records",
    "encode_records",
    "expected_flows",
    "fit_em",
    "learn_hclt",
    "mean_log_likelihood",
    "model_bits",
    "pairwise_mutual_information",
    "random_tree",
]
