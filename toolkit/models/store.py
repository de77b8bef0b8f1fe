"""The model store: a model name or path resolved to a loaded model and the hash a header records.

Every codec finds its models here. A name is one of the shipped models in
``toolkit/assets`` (listed in ``MANIFEST.json``), a local directory, or
(for loaders that take one) a Hugging Face id passed on as it is. A decoder
may be pointed at another location with ``model_dir``: a shipped name is
then looked up as ``model_dir/<name>``, and a path as ``model_dir/<its last
component>`` (or ``model_dir`` itself); the recorded hash decides whether
it is the right model.

Loaded models are cached per process by the files' stamps (name, size and
modification time of every file), so a model changed on disk is reloaded
and re-hashed, and an unchanged one is loaded and hashed once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from toolkit.errors import ModelMismatchError

__all__ = ["ASSETS", "MANIFEST", "Located", "locate", "load", "files_sha256", "file_sha256", "list_models",
           "model_entry", "read_manifest", "update_manifest"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MANIFEST = ASSETS / "MANIFEST.json"
_CACHE_SIZE = 6


def read_manifest(path: str | Path = MANIFEST) -> dict[str, dict]:
    """A manifest file's entries by model name (empty where there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def update_manifest(name: str, entry: dict, path: str | Path = MANIFEST) -> None:
    """Insert or replace ``name`` in a manifest, written through a temporary file and a rename."""
    path = Path(path)
    data = read_manifest(path)
    data[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    if path.resolve() == MANIFEST.resolve():
        _manifest.cache_clear()


@cache
def _manifest() -> dict:
    return read_manifest(MANIFEST)


def list_models() -> dict[str, dict]:
    """Manifest entries of the shipped models, by name."""
    return dict(sorted(_manifest().items()))


def model_entry(name: str) -> dict:
    try:
        return _manifest()[name]
    except KeyError:
        raise ModelMismatchError(f"model {name!r} is not shipped with this build") from None


@dataclass(frozen=True)
class Located:
    """Where a model name points: a local directory, or a hub id (``path`` None)."""

    name: str
    path: Path | None
    hub_id: str | None = None

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"hub id {self.hub_id!r}"


def locate(name: str, model_dir: str | Path | None = None, hub: bool = False) -> Located:
    """Resolve ``name`` (shipped name, directory, or hub id where ``hub``) to a :class:`Located`."""
    shipped = name in _manifest()
    if model_dir is not None:
        base = Path(model_dir)
        tail = name if shipped else Path(name).name
        for cand in (base / tail, base):
            if cand.is_dir():
                return Located(name, cand.resolve())
        raise ModelMismatchError(f"model {name!r} is not in {str(base)!r} (looked for {str(base / tail)!r})")
    if shipped:
        path = ASSETS / name
        if not path.is_dir():
            raise ModelMismatchError(f"the shipped model {name!r} is not installed ({path})")
        return Located(name, path)
    path = Path(name)
    if path.is_dir():
        return Located(name, path.resolve())
    if path.exists():
        raise ModelMismatchError(f"model {name!r} is a file; give its directory")
    if hub and "/" in name and not name.startswith((".", "/")):
        return Located(name, None, hub_id=name)
    raise ModelMismatchError(f"model {name!r} not found (not a shipped model, not a directory)")


def _stamp(path: Path) -> tuple:
    return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in path.rglob("*") if p.is_file()))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of one file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_sha256(paths: list[Path]) -> str:
    """One digest of several files: their SHA-256s, in the given order (a single file: its own SHA-256)."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + bytes.fromhex(file_sha256(p)))
    return h.hexdigest()


_cache: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


def load(kind: str, loader: Callable[[Located], Any], name: str, model_dir: str | Path | None = None,
         hub: bool = False) -> Any:
    """``loader(located)`` for ``name``, cached by ``kind``, location and the files' stamps."""
    where = locate(name, model_dir, hub=hub)
    key = (kind, str(where.path) if where.path is not None else where.hub_id,
           _stamp(where.path) if where.path is not None else ())
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    value = loader(where)
    with _lock:
        _cache[key] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value
