"""What every recipe shares, written once: the command line over a config, threads, the
learning-rate schedule (:mod:`toolkit.schedule`, shared with the libraries that train), the
time budget, and atomic checkpoints that resume.

A recipe is a module of :mod:`toolkit.recipes` with a frozen ``*Config``
(:class:`toolkit.config.Config`) and ``run(config) -> Path``; its ``main`` is
``cli(ItsConfig, run)``, so ``python -m toolkit.recipes.NAME --help`` lists
the config's fields and their help, and a notebook builds the config itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from toolkit.config import Config
from toolkit.errors import ConfigError, ToolkitError
from toolkit.schedule import lr_at, step_progress

__all__ = ["TimeBudget", "cli", "load_checkpoint", "lr_at", "parse_config", "save_checkpoint", "set_threads",
           "step_progress"]

C = TypeVar("C", bound=Config)


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads for the run (``None`` keeps torch's choice)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


class TimeBudget:
    """A wall-clock budget of training seconds that carries across resumes (``elapsed`` is saved)."""

    def __init__(self, seconds: float, elapsed: float = 0.0) -> None:
        self.seconds = seconds
        self._before = elapsed
        self._start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return self._before + time.monotonic() - self._start

    @property
    def progress(self) -> float:
        return self.elapsed / self.seconds if self.seconds > 0 else 1.0

    @property
    def exhausted(self) -> bool:
        return self.elapsed >= self.seconds


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file and a rename: a kill mid-write keeps the previous checkpoint."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The state :func:`save_checkpoint` wrote (tensors and plain values only), or None where there is none."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)


def _config_arg(cls: type[Config], name: str) -> Callable[[str], Config]:
    """The argparse type of a field holding a nested config: its fields as a JSON object."""
    def parse(text: str) -> Config:
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} must be {cls.__name__} fields as JSON: {exc}") from None
        return cls.from_dict(fields)

    return parse


def _arg_type(tp: Any, name: str) -> tuple[Any, bool]:
    """(argparse type, whether the field takes several values) for the annotation of field ``name``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arg_type(args[0], name) if len(args) == 1 else (str, False)
    if origin is tuple:
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (inner[0] if inner else str), True
    if tp in (int, float, str):
        return tp, False
    if tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        return Path, False
    if isinstance(tp, type) and issubclass(tp, Config):
        return _config_arg(tp, name), False
    return str, False


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """The config of ``cls`` from a command line: one ``--field-name`` per field, help from its metadata."""
    ap = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().split("\n")[0])
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        kw: dict[str, Any] = {"help": f.metadata.get("help")}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not required:
            kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if tp is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, required=required, **kw)
            continue
        arg_type, many = _arg_type(tp, f.name)
        ap.add_argument(flag, type=arg_type, nargs="+" if many else None, required=required, **kw)
    return cls(**vars(ap.parse_args(argv)))


def cli(cls: type[C], run: Callable[[C], Path], argv: Sequence[str] | None = None) -> int:
    """A recipe's ``main``: parse the config, run it, print where the result went; errors as one line."""
    doc = (sys.modules[run.__module__].__doc__ or "").strip().split("\n")[0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        out = run(parse_config(cls, argv, description=doc or None))
    except ToolkitError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(out)
    return 0
