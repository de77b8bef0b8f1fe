"""Probabilistic circuits: HCLT structures, compiled tensor circuits, EM, and the PC coder.

Implements the circuits of "Lossless Compression with Probabilistic Circuits"
(Liu, Mandt, Van den Broeck, ICLR 2022) on plain PyTorch: learn a hidden
Chow-Liu tree (:func:`learn_hclt`), compile it (:class:`Circuit`), train it
(:func:`fit_em` under an :class:`EMConfig`; :func:`fit_hclt` does both steps), query it
(marginals, conditionals, samples) and code records with it (:func:`encode_records` /
:func:`decode_records`). Images become records through :mod:`toolkit.circuits.images`
(patch models, trained on the photos of :mod:`toolkit.circuits.photos`); reading and
rebuilding image files is :mod:`toolkit.formats`.

Names resolve on first use, so importing this package (or its torch-free
:mod:`toolkit.circuits.settings`, which a codec's config checks) loads no torch.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["circuit", "coder", "em", "images", "layers", "photos", "settings", "structure", "train"],
    submod_attrs={
        "settings": ["METHODS", "MAX_BATCH"],
        "circuit": ["Circuit"],
        "coder": ["decode_records", "encode_records", "model_bits"],
        "em": ["EMConfig", "expected_flows", "fit_em", "mean_log_likelihood"],
        "images": ["PatchModel", "image_to_records", "records_to_image", "train_patch_model"],
        "photos": ["HELD_OUT_PHOTOS", "TRAIN_PHOTOS", "load_photo"],
        "structure": ["TreeStructure", "chow_liu_tree", "learn_hclt", "pairwise_mutual_information", "random_tree"],
        "train": ["circuit_sha256", "fit_hclt"],
    },
)
