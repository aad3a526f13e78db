"""Disks: raw-or-VHDX detection, partition tables (GPT/MBR), volume views, filesystem sniffing.

This is the hub through which formats reach each other: a volume is a
:class:`~templatetool.blockdev.View` over a disk that is either a raw image or a VHDX.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..blockdev import BlockDevice, RawFile, View, require_disk_bytes
from ..errors import NotFoundError, ResourceError, UsageError
from .fs import sniff_filesystem
from .partitions import (
    BASIC_DATA,
    EFI_SYSTEM,
    MS_RESERVED,
    Partition,
    PartitionTable,
    gpt_sector_size,
    read_partition_table,
)

VHDX_SIGNATURE = b"vhdxfile"

__all__ = [
    "BASIC_DATA",
    "EFI_SYSTEM",
    "MS_RESERVED",
    "SUBFORMATS",
    "Partition",
    "PartitionTable",
    "View",
    "create_disk",
    "disk_format",
    "find_os_volume",
    "gpt_sector_size",
    "locate_volume",
    "open_disk",
    "open_raw",
    "output_subformat",
    "read_partition_table",
    "select_volume",
    "sniff_filesystem",
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
    """Open a raw image or a VHDX (detected by signature) as a BlockDevice.

    Raises FormatError for a file too small to be a disk (empty, or under one sector).
    """
    if disk_format(path) == "vhdx":
        from ..vhdx.disk import open_vhdx

        return open_vhdx(path, writable=writable)
    return open_raw(path, writable)


def open_raw(path: str | os.PathLike[str], writable: bool = False, sector_size: int | None = None) -> RawFile:
    """Open a raw disk image; its logical sector size is ``sector_size``, else detected from the
    GPT (primary header at byte 512 or 4096), else 512. An empty or sub-sector file is a
    FormatError."""
    dev = RawFile(path, writable=writable)
    try:
        require_disk_bytes(dev.size, dev.name)
        ss = sector_size or gpt_sector_size(dev.read, dev.size)
    except BaseException:
        dev.close()
        raise
    if ss:
        dev.sector_size = ss
    return dev


def create_disk(
    path: str | os.PathLike[str],
    size: int,
    like: BlockDevice | None = None,
    fmt: str | None = None,
    subformat: str = "dynamic",
    block_size: int | None = None,
) -> BlockDevice:
    """Create a new empty writable disk: VHDX when ``fmt='vhdx'`` or the name ends in .vhdx/.avhdx.

    ``like`` copies the sector geometry (and VHDX block size) of an existing disk.
    """
    if fmt is None:
        fmt = "vhdx" if str(path).lower().endswith((".vhdx", ".avhdx")) else "raw"
    lss = like.sector_size if like is not None else 512
    if fmt == "vhdx":
        from ..vhdx.writer import create_vhdx

        bs: int | None = block_size or getattr(like, "block_size", None) or None
        pss: int = getattr(like, "physical_sector_size", None) or 4096  # create_vhdx's default
        return create_vhdx(
            path, size, subformat=subformat, block_size=bs, logical_sector_size=lss, physical_sector_size=pss
        )
    return RawFile.create(path, size, sector_size=lss)


SUBFORMATS = ("fixed", "dynamic")


def output_subformat(src: BlockDevice, requested: str | None, out_format: str) -> str:
    """The VHDX subformat of a disk written from ``src``: ``requested`` (fixed|dynamic), else the
    source's own (a fixed VHDX stays fixed), else dynamic (raw or differencing sources)."""
    if requested is not None:
        if requested not in SUBFORMATS:
            raise UsageError(f"unknown VHDX subformat {requested!r}", hint="use fixed or dynamic")
        if out_format != "vhdx":
            raise UsageError(f"--subformat {requested} applies to a .vhdx output only")
        return requested
    own = getattr(src, "subformat", None)
    return own if own in SUBFORMATS else "dynamic"


def locate_volume(
    dev: BlockDevice, partition: int | None = None, want: tuple[str, ...] = ("ntfs", "bitlocker")
) -> tuple[int, int, int | None]:
    """(offset, size, 1-based index or None) of the volume to work on.

    Partition ``partition`` when given; else the largest basic-data partition whose filesystem
    is one of ``want`` (the OS volume); a bare volume image (no partition table) is the whole device.
    """
    head = dev.read(0, 512) if dev.size >= 512 else b""
    bare = head[3:11] in (b"-FVE-FS-", b"NTFS    ")  # a volume image, whatever its BPB says
    table = None if bare else read_partition_table(dev)
    if table is None or table.scheme is None:
        if partition not in (None, 0, 1):
            raise NotFoundError(f"no partition {partition}: the image is a bare volume", dev.name)
        return 0, dev.size, None
    if partition:
        p = table.get(partition)
        return p.offset, p.size, p.index
    best: Partition | None = None
    # BitLocker To Go keeps a FAT stick's MBR type (0x0B/0x0C/0x0E/0x06): look there too for it
    kinds = ("basic-data", "other") + (("fat32", "fat16") if "bitlocker-to-go" in want else ())
    for p in table.partitions:
        if p.kind not in kinds:
            continue
        if sniff_filesystem(p.view(dev)) in want and (best is None or p.size > best.size):
            best = p
    if best is None:
        raise NotFoundError(
            f"no {' or '.join(want)} basic-data partition (OS volume) found",
            dev.name,
            "choose the partition by number",
            code="disk.no-os-volume",
        )
    return best.offset, best.size, best.index


def find_os_volume(table: PartitionTable, dev: BlockDevice) -> Partition:
    """The OS volume: the largest NTFS (or BitLocker) basic-data partition."""
    _off, _size, index = locate_volume(dev)
    if index is None:
        raise NotFoundError("the disk has no partition table", dev.name)
    return table.get(index)


def select_volume(dev: BlockDevice, partition: int | None = None) -> tuple[View, Partition | None]:
    """The volume to operate on: partition N, the OS volume, or the whole device when it has no table."""
    off, size, index = locate_volume(dev, partition)
    if index is None:
        return View(dev, off, size, name=dev.name), None
    part = read_partition_table(dev).get(index)
    return part.view(dev), part
