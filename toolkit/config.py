"""The base every configuration shares: a frozen dataclass that checks itself and round-trips through JSON.

Each config in the toolkit is ``@dataclass(frozen=True)`` over :class:`Config`.
Before a config's own ``__post_init__`` checks run, one shared check holds every
field to its annotation (``int``, ``float``, ``bool``, ``str``, ``Path``, a
tuple or list of those, a nested config, each possibly ``| None``), so a bad
value raises :class:`~toolkit.errors.ConfigError` naming the config, the field
and the value, never a TypeError from deep inside a check. Values are normalised
on the way: numpy integers become ``int``, numbers of a float field ``float``,
strings of a path field ``Path``, lists of a tuple field tuples.

``to_dict`` / ``from_dict`` carry the config with its ``version`` through
manifests and notebooks. ``version`` is a class attribute: it counts changes to
what a config's fields mean, not something a user sets. Configs whose dict
lives in file headers and checkpoints written before they shared this base set
``versioned = False``: their dict is the fields alone, byte for byte what those
files hold.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
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


# --- the shared type check ------------------------------------------------------------------
class _Refused(Exception):
    """A value that does not fit its field's annotation."""


_WORDS = {bool: ("true or false", "true or false values"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"), Path: ("a path", "paths")}


def _scalar(kind: type, value: Any) -> Any:
    """``value`` as a ``kind`` (one of :data:`_WORDS`); :class:`_Refused` with the words of what it is not."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:  # numbers.Integral: numpy's integers too, made plain ints (JSON writes those)
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, str | os.PathLike)
    if not ok:
        raise _Refused(f"is not {_WORDS[kind][0]}")
    return kind(value)


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, ``(tp, False)`` otherwise (a union of several types stays as it is)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _scalar_kind(tp: Any) -> type | None:
    if tp in (bool, int, float, str):
        return tp
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return Path
    return None


def _config_type(tp: Any) -> type[Config] | None:
    """The config class a field holds (``X`` or ``X | None`` for a :class:`Config` subclass ``X``)."""
    tp, _ = _optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Config) else None


def _converter(tp: Any) -> Callable[[Any], Any] | None:
    """The shared check of a field annotated ``tp``: a function that returns the value normalised or raises
    :class:`_Refused`; None for an annotation left to the config's own checks (callables, other types)."""
    inner, optional = _optional(tp)
    kind = _scalar_kind(inner)
    origin = typing.get_origin(inner) or inner
    convert: Callable[[Any], Any]
    if kind is not None:
        convert = functools.partial(_scalar, kind)
    elif origin in (tuple, list):
        args = {a for a in typing.get_args(inner) if a is not Ellipsis}
        item = _scalar_kind(args.pop()) if len(args) == 1 else None  # tuple[int, ...], list[str]

        def convert(value: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise _Refused("is not a list")
            if item is not None:
                try:
                    value = [_scalar(item, v) for v in value]
                except _Refused:
                    raise _Refused(f"is not a list of {_WORDS[item][1]}") from None
            return origin(value)
    elif isinstance(inner, type) and issubclass(inner, Config):
        def convert(value: Any) -> Any:
            if not isinstance(value, inner):
                raise _Refused(f"is not a {inner.__name__}")
            return value
    else:
        return None
    if not optional:
        return convert
    return lambda value: None if value is None else convert(value)


@functools.cache
def _converters(cls: type) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    hints = typing.get_type_hints(cls)
    found = ((f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls))
    return tuple((name, convert) for name, convert in found if convert is not None)


def _check_fields(config: Config) -> None:
    """Hold every field of ``config`` to its annotation, normalising it in place (the shared check)."""
    cls = type(config)
    for name, convert in _converters(cls):
        value = getattr(config, name)
        try:
            new = convert(value)
        except _Refused as exc:
            raise ConfigError(f"{cls.__name__}: {name}={value!r} {exc.args[0]}") from None
        if new is not value:
            object.__setattr__(config, name, new)


class Config:
    """Mixin for frozen dataclass configs: the shared type check, ``to_dict``, ``from_dict``, ``version``,
    ``replace``."""

    version: ClassVar[int] = 1
    #: False: ``to_dict`` is the fields alone and ``from_dict`` takes no ``version`` (the form file headers and
    #: checkpoints held before the configs shared this base; a codec's header has its codec's version)
    versioned: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The shared check runs once per construction, before the config's own checks: wrap each class's own
        # __post_init__, and let only the one the instance's class resolves to (the outermost) run it, so that
        # a subclass calling super().__post_init__() does not check twice.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None:
            return

        @functools.wraps(own)
        def __post_init__(self: Config) -> None:
            if type(self).__post_init__ is __post_init__:
                _check_fields(self)
            own(self)

        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        """The shared check alone, for a config with no checks of its own."""
        if type(self).__post_init__ is Config.__post_init__:
            _check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples become lists, paths strings, nested configs dicts), with
        ``version`` unless the class is not ``versioned``."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        if self.versioned:
            out["version"] = self.version
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config ``to_dict`` wrote; unknown keys, a newer version or a bad value raise ConfigError.

        A nested config's field may be given as its dict; the shared check turns lists into tuples and
        strings into paths."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        if cls.versioned:
            version = data.pop("version", cls.version)
            if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= cls.version:
                raise ConfigError(f"{cls.__name__} version {version!r} is not one this toolkit reads "
                                  f"(1..{cls.version})")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(fields)) or 'none'}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            nested = _config_type(hints[name])
            if nested is not None and isinstance(value, dict):
                data[name] = nested.from_dict(value)
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:  # a required field left out
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (and checked again)."""
        try:
            return dataclasses.replace(self, **changes)  # type: ignore[type-var]
        except TypeError as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}") from None
