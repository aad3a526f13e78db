"""Shared pieces of the atheris harnesses in this folder.

Each harness feeds arbitrary bytes to one parser. Typed :class:`TemplateToolError` refusals are
the expected outcome for bad input; anything else (an untyped exception, a multi-line message, a
hang or a memory blow-up caught by libFuzzer's limits) is a finding. Run one harness directly
(``python fuzz/fuzz_kp.py CORPUS_DIR -max_total_time=60``) or all through ``tools/fuzz.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atheris

with atheris.instrument_imports(include=["templatetool"]):
    import templatetool.errors  # noqa: F401

from templatetool.blockdev import BlockDevice
from templatetool.errors import TemplateToolError


class MemDev(BlockDevice):
    """An in-memory block device (read-only)."""

    def __init__(self, data: bytes, size: int | None = None, sector_size: int = 512, name: str = "fuzz") -> None:
        self.data = data
        self.size = len(data) if size is None else size
        self.sector_size = sector_size
        self.name = name

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = self.data[offset:offset + length]
        return out + bytes(length - len(out))


#: Known finding classes to step over (so a run can look past an already-reported bug):
#: FUZZ_IGNORE=multiline,RecursionError,UnsupportedAlgorithm (exception type names).
IGNORE = {x.strip() for x in os.environ.get("FUZZ_IGNORE", "").split(",") if x.strip()}


def guarded(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Wrap a target: typed refusals pass; their messages must be one line."""

    def one(data: bytes) -> None:
        try:
            target(data)
        except TemplateToolError as e:
            msg = str(e)
            if ("\n" in msg or "\r" in msg) and "multiline" not in IGNORE:
                raise AssertionError(f"multi-line error message: {msg!r}") from None
        except Exception as e:
            if type(e).__name__ not in IGNORE:
                raise

    return one


def main(target: Callable[[bytes], None]) -> None:
    """Run ``target`` under atheris with the command-line arguments (libFuzzer flags)."""
    atheris.Setup(sys.argv, guarded(target))
    atheris.Fuzz()
