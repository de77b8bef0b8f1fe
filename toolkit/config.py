"""The base every configuration shares: a frozen dataclass that checks itself and round-trips through JSON.

Each config in the toolkit is ``@dataclass(frozen=True)`` over :class:`Config`:
values are checked in ``__post_init__`` (``check``), a bad one raises
:class:`~toolkit.errors.ConfigError` before any model or file is touched, and
``to_dict`` / ``from_dict`` carry the config with its ``version`` through
headers, manifests and notebooks. ``version`` is a class attribute: it counts
changes to what a config's fields mean, not something a user sets.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path, PurePath
from typing import Any, ClassVar, TypeVar

from toolkit.errors import ConfigError

__all__ = ["Config", "check"]

C = TypeVar("C", bound="Config")


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _admits(tp: Any, kind: type) -> bool:
    """Whether a field annotation admits ``kind`` (tuple or Path: JSON gives lists and strings back)."""
    origin = typing.get_origin(tp)
    if origin is kind or (isinstance(tp, type) and issubclass(tp, kind)):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_admits(a, kind) for a in typing.get_args(tp))
    return False


class Config:
    """Mixin for frozen dataclass configs: ``to_dict``, ``from_dict``, ``version``, ``replace``."""

    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples become lists, paths strings), with ``version``."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        out["version"] = self.version
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config ``to_dict`` wrote; unknown keys, a newer version or a bad value raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", cls.version)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.version:
            raise ConfigError(f"{cls.__name__} version {version!r} is not one this toolkit reads "
                              f"(1..{cls.version})")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if isinstance(value, list) and _admits(hints.get(name), tuple):
                data[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            elif isinstance(value, str) and _admits(hints.get(name), PurePath):
                data[name] = Path(value)
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (and checked again)."""
        try:
            return dataclasses.replace(self, **changes)  # type: ignore[type-var]
        except TypeError as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from None
