"""Create new VHDX files: fixed, dynamic, or differencing children of an existing VHDX.

Layout we write (Windows-like): file identifier · header 1 (seq N) · header 2 (seq N+1) ·
region tables 1 and 2 (identical) · log at 1 MiB (1 MiB, empty, LogGuid 0) · metadata region at
2 MiB (1 MiB, more when user items need it) · BAT from 3 MiB · payload blocks after the BAT,
every object 1 MiB aligned.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import ResourceError, UsageError
from . import build
from . import structs as S
from .disk import PathLike, VhdxDisk, open_vhdx
from .layout import MetaItem, Region, align_up, bat_geometry, is_pow2

DEFAULT_BLOCK_SIZE = 32 * S.MiB
SUBFORMATS = ("fixed", "dynamic", "differencing")


@dataclass
class ParentLink:
    """What a differencing child records about its parent."""

    data_write_guid: uuid.UUID
    relative_path: str | None
    absolute_win32_path: str | None
    disk_id: uuid.UUID
    virtual_disk_items: list[MetaItem] = field(default_factory=list)  # copied user items
    extra: dict[str, str] = field(default_factory=dict)

    def locator_pairs(self) -> dict[str, str]:
        pairs = {"parent_linkage": "{" + str(self.data_write_guid).lower() + "}"}
        if self.relative_path:
            pairs["relative_path"] = self.relative_path
        if self.absolute_win32_path:
            pairs["absolute_win32_path"] = self.absolute_win32_path
        pairs.update(self.extra)
        return pairs


def win32_absolute(path: Path) -> str:
    """``\\\\?\\`` + the absolute path with backslashes (a POSIX path keeps its root as ``\\``)."""
    return "\\\\?\\" + str(path.absolute()).replace("/", "\\")


def link_to_parent(parent: VhdxDisk, child_path: PathLike) -> ParentLink:
    """A ParentLink for making ``child_path`` a child of the open ``parent``."""
    child = Path(child_path).absolute()
    ppath = parent.path.absolute()
    rel = os.path.relpath(ppath, child.parent)
    items = [it for it in parent.layout.items if it.is_user and it.is_virtual_disk]
    return ParentLink(
        parent.data_write_guid, rel.replace("/", "\\"), win32_absolute(ppath), parent.virtual_disk_id, items
    )


def _validate(size: int, subformat: str, block_size: int, lss: int, pss: int) -> None:
    if subformat not in SUBFORMATS:
        raise UsageError(f"unknown subformat {subformat!r}", hint="use fixed, dynamic or differencing")
    if lss not in (512, 4096):
        raise UsageError(f"logical sector size must be 512 or 4096, not {lss}")
    if pss not in (512, 4096):
        raise UsageError(f"physical sector size must be 512 or 4096, not {pss}")
    if not is_pow2(block_size) or not S.MiB <= block_size <= 256 * S.MiB:
        raise UsageError(f"block size {block_size} must be a power of 2 from 1 MiB to 256 MiB")
    if size <= 0 or size % lss:
        raise UsageError(f"virtual size {size} must be a positive multiple of the {lss}-byte sector")
    if size > S.MAX_DISK_SIZE:
        raise UsageError("virtual size exceeds the VHDX maximum of 64 TiB")


def write_new_vhdx(
    path: PathLike,
    size: int,
    subformat: str = "dynamic",
    block_size: int = DEFAULT_BLOCK_SIZE,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent: ParentLink | None = None,
    data_write_guid: uuid.UUID | None = None,
    disk_id: uuid.UUID | None = None,
) -> None:
    """Write a complete, empty VHDX at ``path`` (overwriting it). Low level: no atomic rename."""
    _validate(size, subformat, block_size, logical_sector_size, physical_sector_size)
    has_parent = parent is not None
    if has_parent != (subformat == "differencing"):
        raise UsageError("a differencing disk needs a parent, and only a differencing disk has one")
    flags = {"fixed": S.FP_LEAVE_BLOCK_ALLOCATED, "dynamic": 0, "differencing": S.FP_HAS_PARENT}[subformat]
    did = parent.disk_id if parent else (disk_id or uuid.uuid4())
    locator = build.parent_locator(parent.locator_pairs()) if parent else None
    items = build.system_items(block_size, flags, size, did, logical_sector_size, physical_sector_size, locator)
    if parent:
        items += [MetaItem(it.item_id, it.flags, it.data) for it in parent.virtual_disk_items]
    md = build.metadata_region(items)
    cr, nblocks, _, total = bat_geometry(size, block_size, logical_sector_size, has_parent)
    md_off = 2 * S.MiB
    bat_off = md_off + len(md)
    bat_len = align_up(total * 8, S.MiB)
    data_off = bat_off + bat_len
    file_size = data_off
    bat = np.zeros(total if subformat == "fixed" else 0, dtype="<u8")
    if subformat == "fixed":
        blocks = np.arange(nblocks, dtype=np.uint64)
        idx = blocks + blocks // np.uint64(cr)
        bat[idx] = (np.uint64(data_off) + blocks * np.uint64(block_size)) | np.uint64(S.PAYLOAD_BLOCK_FULLY_PRESENT)
        file_size = data_off + nblocks * block_size
    regions = [Region(S.BAT_REGION, bat_off, bat_len, 1), Region(S.METADATA_REGION, md_off, len(md), 1)]
    table = build.region_table(regions)
    fwg = uuid.uuid4()
    dwg = data_write_guid or uuid.uuid4()
    try:
        with open(path, "wb") as f:
            f.write(build.file_identifier())
            f.write(build.header(1, fwg, dwg).ljust(64 * S.KiB, b"\0"))
            f.write(build.header(2, fwg, dwg).ljust(64 * S.KiB, b"\0"))
            f.write(table)
            f.write(table)
            f.seek(md_off)
            f.write(md)
            if subformat == "fixed":  # dynamic/differencing BATs are all zero: leave them as a hole
                mv = memoryview(bat.data).cast("B")
                for pos in range(0, len(mv), 16 * S.MiB):
                    f.seek(bat_off + pos)
                    f.write(mv[pos : pos + 16 * S.MiB])
            f.truncate(file_size)
    except OSError as e:
        raise ResourceError(f"cannot write: {e.strerror}", str(path)) from e


def create_vhdx(
    path: PathLike,
    size: int | None,
    subformat: str = "dynamic",
    block_size: int | None = None,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    parent: PathLike | VhdxDisk | None = None,
) -> VhdxDisk:
    """Create a VHDX at ``path`` (atomically) and return it open for writing.

    ``parent`` makes a differencing child of that VHDX: the size and sector sizes come from the
    parent (``size`` may be None), the parent's IsVirtualDisk user items are copied, and the
    locator records the parent's DataWriteGuid, relative path and absolute path.
    """
    link: ParentLink | None = None
    if parent is not None:
        if subformat not in ("dynamic", "differencing"):
            raise UsageError(
                "a child of a parent disk is always differencing",
                hint="give no subformat for a child",
                code="vhdx.child-subformat",
            )
        subformat = "differencing"
        if (
            not isinstance(parent, VhdxDisk)
            and os.path.exists(path)
            and os.path.exists(parent)
            and os.path.samefile(parent, path)
        ):
            raise UsageError("a disk cannot be its own parent", str(path))
        pdisk = parent if isinstance(parent, VhdxDisk) else open_vhdx(parent)
        try:
            if size not in (None, pdisk.size):
                raise UsageError(f"a differencing child has its parent's size ({pdisk.size}), not {size}")
            size = pdisk.size
            logical_sector_size = pdisk.logical_sector_size
            physical_sector_size = pdisk.physical_sector_size
            block_size = block_size or pdisk.block_size
            link = link_to_parent(pdisk, path)
        finally:
            if pdisk is not parent:
                pdisk.close()
    if size is None:
        raise UsageError("a size is needed for a new disk")
    with atomic_output(path) as tmp:
        write_new_vhdx(
            tmp, size, subformat, block_size or DEFAULT_BLOCK_SIZE, logical_sector_size, physical_sector_size, link
        )
    return open_vhdx(path, writable=True)


def is_vhdx(path: PathLike) -> bool:
    """True when the file starts with the ``vhdxfile`` signature."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == S.SIG_FILE
    except OSError:
        return False


__all__ = ["DEFAULT_BLOCK_SIZE", "ParentLink", "create_vhdx", "is_vhdx", "link_to_parent", "write_new_vhdx"]
