"""Streaming conversion between raw images and VHDX (either direction, any subformat)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_output
from ..blockdev import CHUNK, BlockDevice, RawFile, is_zero
from ..errors import UsageError
from ..progress import NullBar as _NullBar
from ..progress import progress as progress_bar
from .disk import PathLike, VhdxDisk, open_vhdx
from .layout import align_up
from .writer import DEFAULT_BLOCK_SIZE, is_vhdx, write_new_vhdx


def open_image(
    path: PathLike,
    writable: bool = False,
    parent_search: Sequence[PathLike] | None = None,
    sector_size: int | None = None,
) -> BlockDevice:
    """Open a raw image or a VHDX, detected by the ``vhdxfile`` signature (not the name).

    A raw image's logical sector size is ``sector_size``, else detected from its GPT (LBA 1 at
    byte 512 or 4096), else 512."""
    if is_vhdx(path):
        return open_vhdx(path, writable=writable, parent_search=parent_search)
    if not Path(path).exists():
        from ..errors import NotFoundError

        raise NotFoundError("no such disk image", str(path))
    if Path(path).is_dir():
        raise UsageError("expected a disk image, got a folder", str(path))
    from ..disk import open_raw

    return open_raw(path, writable, sector_size)  # empty or sub-sector: malformed, as in open_disk


_BUF = 4 * CHUNK


def _read_into(src: BlockDevice, pos: int, dst: memoryview) -> None:
    """Fill ``dst`` from ``src`` at ``pos`` without intermediate copies where the device allows."""
    if isinstance(src, VhdxDisk):
        src._read_into(pos, dst)
    elif isinstance(src, RawFile):
        done = 0
        while done < len(dst):
            k = os.preadv(src.fileno(), [dst[done:]], pos + done)
            if k == 0:  # past the end of a short file: zeros
                dst[done:] = bytes(len(dst) - done)
                break
            done += k
    else:
        dst[:] = src.read(pos, len(dst))


def _copy(src: BlockDevice, dst: BlockDevice, show: bool, desc: str) -> int:
    """Copy every non-zero 1 MiB chunk of ``src``'s allocated ranges into ``dst``; returns bytes written.

    Reads go into one reusable 4 MiB buffer; consecutive non-zero chunks are written with one call.
    """
    ranges = list(src.allocated_ranges())
    total = sum(n for _, n in ranges)
    written = 0
    buf = bytearray(_BUF)
    mv = memoryview(buf)
    with progress_bar(total, desc) if show else _NullBar() as bar:
        for off, n in ranges:
            pos, end = off, off + n
            while pos < end:
                k = min(_BUF - pos % CHUNK, end - pos)
                _read_into(src, pos, mv[:k])
                # split at 1 MiB boundaries (of the disk), skip zero pieces, join the rest
                run_start = run_len = 0
                p = 0
                while p < k:
                    q = min(k, p + CHUNK - (pos + p) % CHUNK)
                    if is_zero(mv[p:q]):
                        if run_len:
                            dst.write(pos + run_start, mv[run_start : run_start + run_len])
                            written += run_len
                            run_len = 0
                    else:
                        if not run_len:
                            run_start = p
                        run_len += q - p
                    p = q
                if run_len:
                    dst.write(pos + run_start, mv[run_start : run_start + run_len])
                    written += run_len
                bar.update(k)
                pos += k
    return written


def convert(
    src: BlockDevice | PathLike,
    dst_path: PathLike,
    to: str = "vhdx",
    subformat: str = "dynamic",
    block_size: int | None = None,
    progress: bool = True,
    parent_search: Sequence[PathLike] | None = None,
    logical_sector_size: int | None = None,
) -> dict[str, Any]:
    """Copy ``src`` (raw or VHDX, a path or an open BlockDevice) to a new VHDX or raw file.

    Streams over ``src.allocated_ranges()`` and skips all-zero 1 MiB chunks, so holes and
    unallocated blocks stay sparse. The output appears only when complete (atomic rename).
    A raw source whose size is not a sector multiple is padded with zeros to the next sector.
    A VHDX output keeps the source's logical sector size: a VHDX's own, a raw image's from its
    GPT (header at byte 512 or 4096), or ``logical_sector_size`` (512 or 4096) when given.
    """
    if to not in ("vhdx", "raw"):
        raise UsageError(f"unknown output format {to!r}", hint="use vhdx or raw")
    if subformat not in ("fixed", "dynamic"):
        raise UsageError(f"convert writes fixed or dynamic VHDX, not {subformat!r}")
    if logical_sector_size not in (None, 512, 4096):
        raise UsageError(f"logical sector size {logical_sector_size} is not 512 or 4096")
    own = not isinstance(src, BlockDevice)
    dev: BlockDevice = (
        src
        if isinstance(src, BlockDevice)
        else open_image(src, parent_search=parent_search, sector_size=logical_sector_size)
    )
    try:
        if logical_sector_size and dev.sector_size != logical_sector_size:
            raise UsageError(
                f"the source has {dev.sector_size}-byte logical sectors, not {logical_sector_size}",
                dev.name,
                "a logical sector size reinterprets raw images only",
                code="vhdx.sector-size-raw-only",
            )
        if not isinstance(src, BlockDevice) and os.path.exists(dst_path) and os.path.samefile(src, dst_path):
            raise UsageError("source and destination are the same file", str(dst_path))
        if dev.size <= 0:
            raise UsageError("the source disk is empty", dev.name)
        with atomic_output(dst_path) as tmp:
            if to == "raw":
                out: BlockDevice = RawFile.create(tmp, dev.size, sector_size=dev.sector_size)
            else:
                lss = dev.sector_size if dev.sector_size in (512, 4096) else 512
                pss = getattr(dev, "physical_sector_size", 4096)
                bs = block_size or getattr(dev, "block_size", None) or DEFAULT_BLOCK_SIZE
                write_new_vhdx(tmp, align_up(dev.size, lss), subformat, bs, lss, pss)
                out = VhdxDisk(tmp, writable=True)
            try:
                written = _copy(dev, out, progress, f"convert {Path(dev.name).name}")
                out.flush()
            finally:
                out.close()
        return {
            "source": dev.name,
            "destination": str(dst_path),
            "format": to,
            "subformat": subformat if to == "vhdx" else None,
            "virtual_size": dev.size,
            "bytes_written": written,
            "file_size": os.path.getsize(dst_path),
        }
    finally:
        if own:
            dev.close()
