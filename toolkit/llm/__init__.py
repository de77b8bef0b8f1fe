"""LLM compression: weight quantization (``toolkit.llm.quant``) and its evaluation (``toolkit.llm.eval``).

Names resolve on first use so that ``import toolkit.llm`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "quantize_": "toolkit.llm.quant",
    "find_targets": "toolkit.llm.quant",
    "QuantConfig": "toolkit.llm.quant",
    "RTNConfig": "toolkit.llm.quant",
    "GPTQConfig": "toolkit.llm.quant",
    "OutlierConfig": "toolkit.llm.quant",
    "QuantizedLinear": "toolkit.llm.quant",
    "save_quantized": "toolkit.llm.quant.checkpoint",
    "load_quantized": "toolkit.llm.quant.checkpoint",
}
_SUBMODULES = {"quant", "eval"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"toolkit.llm.{name}")
    raise AttributeError(f"module 'toolkit.llm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
