"""Progress reporting: one tqdm bar per pass over disk data, quiet when not a TTY or --quiet.

tqdm is imported only when a bar is shown (it costs ~25 ms at import, mostly its version
lookup through importlib.metadata): a quiet run gets a :class:`NullBar`.

The bars start no thread: tqdm's monitor thread (started by the first bar unless
``monitor_interval`` is 0) would be alive when the parallel engine forks its workers, and a
fork with another thread alive may deadlock (Python 3.12 warns). Our bar class turns it off for
its own bars only; tqdm's global setting is left alone.
"""

from __future__ import annotations

import sys
from typing import Any

_quiet = False
_bar_class: Any = None


class NullBar:
    """A disabled bar (what :func:`progress` returns when quiet): ``update`` does nothing."""

    n = 0

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float = 1) -> None:
        """Ignore progress."""

    def close(self) -> None:
        """Nothing to close."""


def _tqdm_bar() -> Any:
    """tqdm's bar class without the monitor thread (see the module docstring), made on first use."""
    global _bar_class
    if _bar_class is None:
        from tqdm import tqdm

        class Bar(tqdm):  # type: ignore[misc]
            monitor_interval = 0

        _bar_class = Bar
    return _bar_class


def set_quiet(quiet: bool) -> None:
    """Globally silence progress bars (the CLI's ``--quiet``)."""
    global _quiet
    _quiet = quiet


def progress(total: int | None, desc: str, unit: str = "B", **kw: Any) -> Any:
    """Return a tqdm bar writing to stderr, or a :class:`NullBar` when quiet or when stdout or
    stderr is not a TTY.

    Use as a context manager and call ``bar.update(nbytes)`` per chunk.
    """
    if _quiet or not (sys.stdout.isatty() and sys.stderr.isatty()):
        return NullBar()
    return _tqdm_bar()(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        file=sys.stderr,
        leave=False,
        **kw,
    )


__all__ = ["NullBar", "progress", "set_quiet"]
