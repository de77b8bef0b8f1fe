"""The one form of progress reporting: ``progress: bool | Callable[[int, int], None]``.

Long work takes ``progress``: ``False`` says nothing, ``True`` draws a tqdm bar
on stderr, and a callable is called as ``progress(done, total)``. A library
function turns that into one callback with :func:`reporter` and calls it
after each unit of work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Union

from toolkit.errors import ConfigError

__all__ = ["Progress", "reporter"]

Progress = Union[bool, Callable[[int, int], None]]  # noqa: UP007 (a runtime alias must work on Python 3.10)


def reporter(progress: Progress, total: int, desc: str = "") -> Callable[[int, int], None]:
    """A ``(done, total)`` callback for ``progress`` (a total of 0: not known yet); a True value draws a
    tqdm bar that closes when done."""
    if progress is None or progress is False:
        return lambda done, total: None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total or None, desc=desc or None, leave=False, file=sys.stderr)

        def update(done: int, total: int) -> None:
            bar.total = total or None
            bar.n = done
            bar.refresh()
            if total and done >= total:
                bar.close()

        return update
    if callable(progress):
        return progress
    raise ConfigError(f"progress must be a bool or a callable(done, total), got {type(progress).__name__}")
