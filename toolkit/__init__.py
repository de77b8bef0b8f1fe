"""toolkit: compress models and media with learned models.

The public API is small and lazy: importing ``toolkit`` loads no torch, no
codec and no CUDA; names resolve on first use.

>>> import toolkit
>>> blob = toolkit.compress(b"hello hello hello", codec="zstd")
>>> toolkit.decompress(blob)
b'hello hello hello'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "compress": "toolkit.api",
    "decompress": "toolkit.api",
    "compress_stream": "toolkit.api",
    "decompress_stream": "toolkit.api",
    "info": "toolkit.api",
    "choose_codec": "toolkit.api",
    "Choice": "toolkit.api",
    "register_codec": "toolkit.codecs.registry",
    "get_codec": "toolkit.codecs.registry",
    "list_codecs": "toolkit.codecs.registry",
    "Codec": "toolkit.codecs.registry",
    "ToolkitError": "toolkit.errors",
    "FormatError": "toolkit.errors",
    "ChecksumError": "toolkit.errors",
    "ModelMismatchError": "toolkit.errors",
    "UnsupportedInputError": "toolkit.errors",
    "DependencyError": "toolkit.errors",
}
_SUBMODULES = {"codecs", "entropy", "formats", "text", "kernels", "circuits", "models", "data", "notebook", "errors",
               "vision", "llm", "bench", "audio"}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"toolkit.{name}")
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
