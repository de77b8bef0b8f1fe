"""Triton kernels, each beside its torch reference.

Every op lives in ``toolkit/kernels/<op>.py`` with ``<op>_reference`` (torch)
and ``<op>_triton``; the public ``<op>()`` calls :func:`dispatch`, which takes
the Triton path for CUDA tensors and the reference for everything else.
Under ``TRITON_INTERPRET=1`` the Triton path also runs on CPU tensors, which
is how the tests check each kernel against its reference without a GPU
(see :mod:`toolkit.kernels.testing`).
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["backend", "int_linear", "kv_attention", "kv_quant", "pack", "qmatmul", "rans", "sum_layer", "testing"],
    submod_attrs={
        "backend": ["dispatch", "triton_available"],
        "qmatmul": ["quant_matmul"],
        "rans": ["decode_lanes", "decode_segments"],
    },
)
