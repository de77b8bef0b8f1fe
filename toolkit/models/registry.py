"""Registry of shipped models.

Shipped weights live in ``toolkit/assets/<name>/`` and are described in
``toolkit/assets/MANIFEST.json`` (data, command, hash, figures). Loaders
register with ``@register_model(name)``; ``codec list`` shows the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from toolkit.errors import ModelMismatchError

__all__ = ["ASSETS", "register_model", "get_model_loader", "list_models", "get_model_entry"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
_LOADERS: dict[str, Callable[..., Any]] = {}


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a loader function for a shipped model (a duplicate name is an error)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _LOADERS and _LOADERS[name] is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _LOADERS[name] = fn
        return fn

    return deco


def get_model_loader(name: str) -> Callable[..., Any]:
    try:
        return _LOADERS[name]
    except KeyError:
        raise ModelMismatchError(f"model {name!r} is not installed") from None


@cache
def _manifest() -> dict:
    path = ASSETS / "MANIFEST.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def list_models() -> dict[str, dict]:
    """Manifest entries of the shipped models, by name."""
    return dict(sorted(_manifest().items()))


def get_model_entry(name: str) -> dict:
    try:
        return _manifest()[name]
    except KeyError:
        raise ModelMismatchError(f"model {name!r} is not shipped with this build") from None
