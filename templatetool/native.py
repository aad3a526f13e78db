"""The optional compiled helpers (``templatetool/_xts.c``): loops over OpenSSL primitives.

``native()`` returns the module, or None when it was not built (no compiler or no
libcrypto.so.3 at install time) or ``TEMPLATETOOL_NATIVE=0`` disables it. Every caller has a
pure-Python/numpy path giving the same bytes; the tests run both.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Protocol, cast


class Native(Protocol):
    """What ``_xts`` offers."""

    def xts(self, key: bytes, data: Any, out: Any, first_sector: int, sector_size: int, encrypt: bool, /) -> None:
        """XTS over whole sectors of ``data`` into ``out`` (sector numbers from ``first_sector``)."""

    def stretch(self, initial_hash: bytes, salt: bytes, rounds: int, /) -> bytes:
        """BitLocker's key stretch: 32 bytes."""


try:
    _module: Native | None = cast(Native, importlib.import_module(f"{__package__}._xts"))
except ImportError:  # pragma: no cover - depends on the build
    _module = None


def native() -> Native | None:
    """The compiled module, or None (not built, or disabled with ``TEMPLATETOOL_NATIVE=0``)."""
    if _module is None or os.environ.get("TEMPLATETOOL_NATIVE", "1") == "0":
        return None
    return _module


def built() -> bool:
    """True when the extension was built (whatever ``TEMPLATETOOL_NATIVE`` says)."""
    return _module is not None
