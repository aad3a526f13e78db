"""Progress reporting: one tqdm bar per pass over disk data, quiet when not a TTY or --quiet.

The bars start no thread: tqdm's monitor thread (started by the first bar unless
``monitor_interval`` is 0) would be alive when the parallel engine forks its workers, and a
fork with another thread alive may deadlock (Python 3.12 warns). Our bar class turns it off for
its own bars only; tqdm's global setting is left alone.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_quiet = False


class Bar(tqdm):  # type: ignore[misc]
    """A tqdm bar without the monitor thread (see the module docstring)."""

    monitor_interval = 0


def set_quiet(quiet: bool) -> None:
    """Globally silence progress bars (the CLI's ``--quiet``)."""
    global _quiet
    _quiet = quiet


def progress(total: int | None, desc: str, unit: str = "B", **kw: Any) -> Bar:
    """Return a tqdm bar writing to stderr; disabled when quiet or stdout/stderr is not a TTY.

    Use as a context manager and call ``bar.update(nbytes)`` per chunk.
    """
    disable = _quiet or not (sys.stdout.isatty() and sys.stderr.isatty())
    return Bar(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=disable,
        file=sys.stderr,
        leave=False,
        **kw,
    )


__all__ = ["progress", "set_quiet"]
