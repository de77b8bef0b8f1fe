"""Helpers for notebooks that double as integration tests.

A notebook calls :func:`record` for the numbers a test should check; they go
to the JSON file named by ``TOOLKIT_RECORD`` (default ``toolkit_record.json``
in the working directory). :func:`smoke` tells whether the run should be
small (``TOOLKIT_SMOKE=1``, as in CI).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["record", "recorded", "smoke", "record_path"]


def smoke() -> bool:
    """True when ``TOOLKIT_SMOKE`` is set to a true value (small, fast runs)."""
    return os.environ.get("TOOLKIT_SMOKE", "0").lower() in ("1", "true", "yes")


def record_path() -> Path:
    return Path(os.environ.get("TOOLKIT_RECORD", "toolkit_record.json"))


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def record(name: str, value: Any) -> Any:
    """Store ``value`` under ``name`` in the record file (merging with what is there); returns it."""
    path = record_path()
    data = recorded()
    data[name] = _plain(value)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return value


def recorded() -> dict:
    """Everything recorded so far in the current record file."""
    path = record_path()
    if not path.exists():
        return {}
    return json.loads(path.read_text())
