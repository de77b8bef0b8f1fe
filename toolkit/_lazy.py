"""The one lazy loader behind every ``__init__.py``: a table of names, resolved on first use.

``attach`` is the scientific-python ``lazy_loader`` shape (SPEC 1), and
delegates to that library: it gives a package's ``__getattr__``, ``__dir__``
and ``__all__`` from a set of submodules and a ``{submodule: [names]}``
table, so importing a package costs nothing until a name is used (``import
toolkit`` loads no torch). A package file becomes::

    __getattr__, __dir__, __all__ = attach(__name__, submodules=["io"], submod_attrs={"codec": ["AudioCodec"]})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lazy_loader

__all__ = ["attach"]


def attach(package: str, submodules: Iterable[str] = (),
           submod_attrs: Mapping[str, Iterable[str]] | None = None
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: its ``submodules`` and the names each module gives.

    A name listed under two modules is a mistake in the table, refused here
    rather than resolved to whichever comes last.
    """
    attrs = {module: list(names) for module, names in (submod_attrs or {}).items()}
    seen: dict[str, str] = {}
    for module, names in attrs.items():
        for name in names:
            if name in seen:
                raise ValueError(f"{package}: {name!r} is listed under both {seen[name]!r} and {module!r}")
            seen[name] = module
    getattr_, dir_, all_ = lazy_loader.attach(package, submodules=sorted(set(submodules)), submod_attrs=attrs)
    return getattr_, dir_, sorted(all_)
