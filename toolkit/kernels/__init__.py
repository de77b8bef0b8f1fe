"""Triton kernels, each beside its torch reference.

Every op lives in ``toolkit/kernels/<op>.py`` with ``<op>_reference`` (torch)
and ``<op>_triton``; the public ``<op>()`` calls :func:`dispatch`, which takes
the Triton path for CUDA tensors and the reference for everything else.
Under ``TRITON_INTERPRET=1`` the Triton path also runs on CPU tensors, which
is how the tests check each kernel against its reference without a GPU
(see :mod:`toolkit.kernels.testing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["dispatch", "triton_available", "logits_to_freqs", "quant_matmul"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def dispatch(
    reference: Callable[..., Any],
    triton_impl: Callable[..., Any],
    tensor: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run ``triton_impl`` for CUDA tensors when Triton is present, else ``reference``."""
    if tensor.is_cuda and triton_available():
        return triton_impl(tensor, *args, **kwargs)
    return reference(tensor, *args, **kwargs)


def __getattr__(name: str) -> Any:
    # Lazy: importing a kernel module imports triton, which is slow.
    if name == "logits_to_freqs":
        from toolkit.kernels.freqs import logits_to_freqs

        return logits_to_freqs
    if name == "quant_matmul":
        from toolkit.kernels.qmatmul import quant_matmul

        return quant_matmul
    raise AttributeError(name)
