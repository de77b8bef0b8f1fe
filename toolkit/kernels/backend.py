"""Which implementation of a kernel runs: Triton for CUDA tensors, the torch reference elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["dispatch", "triton_available"]


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
