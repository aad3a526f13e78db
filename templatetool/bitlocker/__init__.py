"""BitLocker (FVE) volumes in Windows' on-disk format: read, unlock, decrypt and encrypt offline.

Public API: :func:`open_fve`, :func:`is_bitlocker`, :class:`FveVolume` (``info()``, ``unlock()``),
:class:`DecryptedVolume`, :func:`encrypt_volume` with :class:`ProtectorSpec` and
:class:`FveRegions`, :func:`reserve_ntfs` / :func:`find_reserved`, the key helpers in
:mod:`.keys` and :func:`bitlocker_summary` (used by ``inspect``).
"""

from __future__ import annotations

from typing import Any

from ..blockdev import BlockDevice
from .keys import (
    build_bek,
    generate_recovery_password,
    parse_bek,
    parse_recovery_password,
    stretch_key,
)
from .volume import (
    DecryptedVolume,
    EncryptResult,
    FveRegions,
    FveVolume,
    ProtectorResult,
    ProtectorSpec,
    encrypt_volume,
    is_bitlocker,
    open_fve,
    summary,
)


def bitlocker_summary(view: BlockDevice) -> dict[str, Any] | None:
    """BitLocker details of a volume (method, sector size, protectors, copies) or None."""
    return summary(view)


def __getattr__(name: str) -> Any:  # lazy: reserve imports dissect.ntfs
    if name in ("reserve_ntfs", "find_reserved"):
        from . import reserve

        return getattr(reserve, name)
    if name in ("in_place", "refuse_if_converting"):
        from . import inplace

        return getattr(inplace, name)
    raise AttributeError(name)


__all__ = [
    "DecryptedVolume",
    "EncryptResult",
    "FveRegions",
    "FveVolume",
    "ProtectorResult",
    "ProtectorSpec",
    "bitlocker_summary",
    "build_bek",
    "encrypt_volume",
    "find_reserved",
    "generate_recovery_password",
    "in_place",
    "is_bitlocker",
    "open_fve",
    "parse_bek",
    "parse_recovery_password",
    "refuse_if_converting",
    "reserve_ntfs",
    "stretch_key",
]
