"""Disks: raw-or-VHDX detection, partition tables (GPT/MBR), volume views, filesystem sniffing.

This is the hub through which formats reach each other: a volume is a
:class:`~templatetool.blockdev.View` over a disk that is either a raw image or a VHDX.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..blockdev import BlockDevice, RawFile, View
from ..errors import NotFoundError, ResourceError, UsageError
from .fs import sniff_filesystem
from .partitions import (BASIC_DATA, EFI_SYSTEM, MS_RESERVED, Partition, PartitionTable,
                         read_partition_table)

VHDX_SIGNATURE = b"vhdxfile"

__all__ = [
    "open_disk", "create_disk", "disk_format", "read_partition_table", "find_os_volume",
    "sniff_filesystem", "Partition", "PartitionTable", "BASIC_DATA", "EFI_SYSTEM", "MS_RESERVED",
    "select_volume", "View",
]


def disk_format(path: str | os.PathLike[str]) -> str:
    """'vhdx' or 'raw', by signature (not by file name)."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError("no such disk", str(p))
    if p.is_dir():
        raise UsageError("expected a disk image, got a folder", str(p))
    try:
        with open(p, "rb") as f:
            sig = f.read(8)
    except OSError as e:
        raise ResourceError(f"cannot read: {e.strerror}", str(p)) from e
    return "vhdx" if sig == VHDX_SIGNATURE else "raw"


def open_disk(path: str | os.PathLike[str], writable: bool = False) -> BlockDevice:
    """Open a raw image or a VHDX (detected by signature) as a BlockDevice."""
    if disk_format(path) == "vhdx":
        from ..vhdx import open_vhdx

        return open_vhdx(path, writable=writable)
    return RawFile(path, writable=writable)


def create_disk(path: str | os.PathLike[str], size: int, like: BlockDevice | None = None,
                fmt: str | None = None, subformat: str = "dynamic", block_size: int | None = None) -> BlockDevice:
    """Create a new empty writable disk: VHDX when ``fmt='vhdx'`` or the name ends in .vhdx/.avhdx.

    ``like`` copies the sector geometry (and VHDX block size) of an existing disk.
    """
    if fmt is None:
        fmt = "vhdx" if str(path).lower().endswith((".vhdx", ".avhdx")) else "raw"
    lss = like.sector_size if like is not None else 512
    if fmt == "vhdx":
        from ..vhdx import create_vhdx

        kw: dict[str, object] = {"subformat": subformat, "logical_sector_size": lss}
        bs = block_size or getattr(like, "block_size", None)
        if bs:
            kw["block_size"] = bs
        pss = getattr(like, "physical_sector_size", None)
        if pss:
            kw["physical_sector_size"] = pss
        return create_vhdx(path, size, **kw)
    return RawFile.create(path, size, sector_size=lss)


def find_os_volume(table: PartitionTable, dev: BlockDevice) -> Partition:
    """The OS volume: the largest NTFS basic-data partition (GPT) or NTFS partition (MBR)."""
    best: Partition | None = None
    for p in table.partitions:
        if p.kind not in ("basic-data", "other"):
            continue
        if sniff_filesystem(p.view(dev)) not in ("ntfs", "bitlocker"):
            continue
        if best is None or p.size > best.size:
            best = p
    if best is None:
        raise NotFoundError("no NTFS basic-data partition (OS volume) found", dev.name,
                            "pass --partition N to choose one")
    return best


def select_volume(dev: BlockDevice, partition: int | None = None) -> tuple[View, Partition | None]:
    """The volume to operate on: partition N, the OS volume, or the whole device when it has no table."""
    table = read_partition_table(dev)
    if table.scheme is None:
        if partition not in (None, 0, 1):
            raise NotFoundError(f"no partition {partition}: the image is a bare volume", dev.name)
        return View(dev, 0, dev.size, name=dev.name), None
    part = table.get(partition) if partition else find_os_volume(table, dev)
    return part.view(dev), part
