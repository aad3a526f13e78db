"""Protect a golden disk: preflight, copy, reserve BitLocker's regions, measure, sign, embed.

``protect`` never edits its input: it writes a new disk (VHDX when the output name ends in
``.vhdx``; a raw image otherwise, with the signed catalog beside it as ``OUT.vsc``), atomically.
Free clusters of the OS volume are written as zeros in the output, so the output volume is
byte-for-byte what the catalog measured.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_output, write_bytes_atomic
from ..blockdev import CHUNK, BlockDevice, RawFile, is_zero
from ..catalog import DEFAULT_BLOCK_SIZE, VSC_METADATA_GUID
from ..catalog.document import CatalogDocument, VolumeInfo, parse_version, uuid_str
from ..catalog.measure import FREE_NTFS, Measurer
from ..catalog.ntfs import FreeMap, ntfs_free_map
from ..catalog.vsc import sign_catalog
from ..errors import PolicyError, TemplateToolError, UsageError
from ..progress import progress
from ..signers.base import Signer

#: BitLocker needs three 64 KiB metadata regions and an 8 KiB relocated-header region.
BITLOCKER_RESERVE = (3 * 65536, 8192)


@dataclass
class Problem:
    """One preflight failure: what is wrong and what to do about it."""

    code: str
    what: str
    hint: str

    def __str__(self) -> str:
        return f"{self.what}; {self.hint}"

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "what": self.what, "hint": self.hint}


@dataclass
class ProtectResult:
    """What ``protect`` produced."""

    output: str
    vsc_path: str | None
    document: CatalogDocument
    der: bytes
    signer: str
    reserved: list[dict[str, int]]
    bytes_read: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = self.document
        return {
            "output": self.output, "vsc": self.vsc_path, "name": d.name, "version": d.version_str,
            "signer": self.signer, "root": d.root.hex(), "block_size": d.block_size,
            "block_count": d.block_count, "volume": d.volume.to_json(), "reserved": self.reserved,
            "catalog_bytes": len(self.der), "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3),
        }


def _needed_clusters(cluster_size: int) -> int:
    return sum((n + cluster_size - 1) // cluster_size * k for n, k in ((65536, 3), (8192, 1)))


def _os_candidates(table: Any, dev: BlockDevice) -> Any:
    """The partition meant as OS volume: the largest basic-data (GPT) / data (MBR) partition."""
    kinds = ("basic-data", "other", "fat32", "fat16")
    cands = [p for p in table.partitions if p.kind in kinds]
    return max(cands, key=lambda p: p.size) if cands else None


def preflight(disk_path: str | os.PathLike[str]) -> list[Problem]:
    """Check everything ``protect`` needs; return ALL problems found (empty list: ready)."""
    from ..bitlocker.reserve import find_reserved
    from ..disk import open_disk, read_partition_table, sniff_filesystem

    path = str(disk_path)
    probs: list[Problem] = []
    try:
        dev = open_disk(path)
    except TemplateToolError as e:
        msg = str(e)
        if "parent" in msg:
            return [Problem("differencing", f"the disk is a differencing disk and cannot be opened alone: {e}",
                            "merge it into a standalone disk first (e.g. qemu-img convert or Merge-VHD)")]
        if "log" in msg and "replay" in msg:
            return [Problem("log", f"the VHDX has a pending log: {e}",
                            "replay it (qemu-img check -r all FILE, or attach it once in Hyper-V)")]
        return [Problem("open", f"cannot open the disk: {e}", "give a readable VHDX or raw disk image")]
    try:
        parent = getattr(dev, "parent", None)
        subformat = getattr(dev, "subformat", None)
        if parent is not None or subformat == "differencing" or path.lower().endswith(".avhdx"):
            probs.append(Problem("differencing", "the disk is a differencing disk (it has a parent)",
                                 "merge it into a standalone disk first (e.g. qemu-img convert or Merge-VHD)"))
        try:
            table = read_partition_table(dev)
        except TemplateToolError as e:
            probs.append(Problem("partition-table", f"cannot read the partition table: {e}",
                                 "the disk needs a valid GPT partition table"))
            return probs
        if table.scheme != "gpt":
            what = "the disk has an MBR partition table" if table.scheme == "mbr" else "the disk has no partition table"
            probs.append(Problem("not-gpt", what, "use a GPT disk (generation 2 VM; convert with MBR2GPT or sgdisk -g)"))
        if any(p.kind in ("ldm-metadata", "ldm-data") for p in table.partitions):
            probs.append(Problem("dynamic-disk", "the disk is a Windows dynamic disk (LDM)",
                                 "convert it to a basic disk; BitLocker does not support dynamic disks"))
        if table.scheme is not None and not any(p.kind == "efi-system" for p in table.partitions):
            probs.append(Problem("no-boot-partition", "the disk has no EFI system (boot) partition",
                                 "the OS volume is encrypted: the boot loader needs its own unencrypted partition"))
        osp = _os_candidates(table, dev) if table.scheme is not None else None
        if osp is None:
            if table.scheme is not None:
                probs.append(Problem("no-os-volume", "no basic-data partition to serve as OS volume",
                                     "the disk needs an NTFS OS partition"))
            return probs
        view = osp.view(dev)
        fs = sniff_filesystem(view)
        if fs in ("bitlocker", "bitlocker-to-go"):
            probs.append(Problem("bitlocker", f"the OS volume (partition {osp.index}) is already BitLocker-encrypted",
                                 "protect the unencrypted golden disk (decrypt it first)"))
            return probs
        if fs != "ntfs":
            probs.append(Problem("not-ntfs", f"the OS volume (partition {osp.index}) is {fs or 'not a known filesystem'}, not NTFS",
                                 "format the OS volume with NTFS; BitLocker needs NTFS"))
            return probs
        try:
            reserved = find_reserved(view)
        except TemplateToolError as e:
            probs.append(Problem("bad-reservation", f"unusable BitLocker reservation: {e}",
                                 "remove the FVE2.* files from the OS volume and try again"))
            reserved = None
        if reserved is None:
            try:
                fm = ntfs_free_map(view)
            except TemplateToolError as e:
                probs.append(Problem("ntfs", f"cannot read the NTFS volume: {e}", "run chkdsk /f on it"))
                return probs
            need = _needed_clusters(fm.cluster_size)
            if fm.free_clusters < need:
                probs.append(Problem("no-room",
                                     f"the OS volume has {fm.free_clusters * fm.cluster_size} bytes free, BitLocker needs "
                                     f"{need * fm.cluster_size} (3 x 64 KiB + 8 KiB in whole clusters)",
                                     "free some space on the OS volume or extend the partition"))
    finally:
        dev.close()
    return probs


def _copy_outside(src: BlockDevice, dst: BlockDevice, skip: tuple[int, int], bar: Any) -> int:
    """Copy the allocated, non-zero data of ``src`` outside ``skip`` (offset, length)."""
    s0, s1 = skip[0], skip[0] + skip[1]
    copied = 0
    for o, n in src.allocated_ranges():
        e = o + n
        for a, b in ((o, min(e, s0)), (max(o, s1), e)):
            pos = a
            while pos < b:
                k = min(CHUNK, b - pos)
                data = src.read(pos, k)
                copied += k
                if not is_zero(data):
                    dst.write(pos, data)
                pos += k
                bar.update(k)
    return copied


def _mask(data: bytes, offset: int, fm: FreeMap) -> bytes:
    import numpy as np

    used = fm.used_in(offset, len(data))
    if used is None or used.all():
        return data
    cs = fm.cluster_size
    arr = np.frombuffer(data, dtype=np.uint8).copy()
    full = min(len(arr), used.shape[0] * cs) // cs
    arr[: full * cs].reshape(full, cs)[~used[:full]] = 0
    return arr.tobytes()


def protect(golden_path: str | os.PathLike[str], out_path: str | os.PathLike[str], name: str,
            version: str, signer: Signer, *, block_size: int = DEFAULT_BLOCK_SIZE, pss: bool = False,
            overwrite: bool = False, workers: int | None = None) -> ProtectResult:
    """Make a signed template disk from ``golden_path`` (never modified) at ``out_path``."""
    from ..bitlocker.reserve import find_reserved, reserve_ntfs
    from ..disk import create_disk, find_os_volume, open_disk, read_partition_table

    t0 = time.perf_counter()
    parse_version(version)
    src_p, out_p = Path(golden_path), Path(out_path)
    if out_p.exists() and src_p.exists() and os.path.samefile(src_p, out_p):
        raise UsageError("the output is the input", str(out_p), "protect writes a new disk; choose another name")
    if out_p.exists() and not overwrite:
        raise UsageError("output exists", str(out_p), "choose another name or remove it")
    problems = preflight(src_p)
    if problems:
        raise PolicyError(f"{len(problems)} preflight problem(s): " + " | ".join(str(p) for p in problems),
                          str(src_p), "run 'templatetool protect --check' for the list")
    fmt = "vhdx" if out_p.name.lower().endswith(".vhdx") else "raw"
    src = open_disk(src_p)
    bytes_read = 0
    try:
        table = read_partition_table(src)
        part = find_os_volume(table, src)
        os_view = part.view(src)
        with atomic_output(out_p, 0o644) as tmp_out, \
                tempfile.TemporaryDirectory(prefix=".tt-protect-", dir=out_p.parent) as td:
            regions = find_reserved(os_view)
            if regions is None:
                # ntfscp works on a raw volume file: copy the volume out, reserve, read it back.
                raw_path = Path(td) / "volume.raw"
                raw = RawFile.create(raw_path, os_view.size, sector_size=src.sector_size)
                try:
                    with progress(os_view.size, "staging volume") as bar:
                        for o, n in os_view.allocated_ranges():
                            pos = o
                            while pos < o + n:
                                k = min(CHUNK, o + n - pos)
                                data = os_view.read(pos, k)
                                bytes_read += k
                                if not is_zero(data):
                                    raw.write(pos, data)
                                pos += k
                                bar.update(k)
                    raw.flush()
                finally:
                    raw.close()
                regions = reserve_ntfs(raw_path)
                vol: BlockDevice = RawFile(raw_path, sector_size=src.sector_size)
            else:
                vol = os_view
            try:
                fm = ntfs_free_map(vol)
                if block_size % fm.cluster_size:
                    raise UsageError(f"block size {block_size} is not a multiple of the cluster size {fm.cluster_size}")
                dst = create_disk(tmp_out, src.size, like=src, fmt=fmt)
                try:
                    with progress(src.size, "writing template") as bar:
                        bytes_read += _copy_outside(src, dst, (part.offset, part.size), bar)
                        m = Measurer(vol.size, block_size, None, workers)
                        try:
                            nblocks = m.block_count
                            i = 0
                            while i < nblocks:
                                off = i * block_size
                                blen = min(block_size, vol.size - off)
                                used = fm.used_in(off, blen)
                                if used is not None and used.shape[0] * fm.cluster_size >= blen and not used.any():
                                    m.feed_zeros(off, blen)  # all free: measured as zeros, written as nothing
                                else:
                                    data = vol.read(off, blen)
                                    bytes_read += blen
                                    masked = _mask(data, off, fm)
                                    if not is_zero(masked):
                                        dst.write(part.offset + off, masked)
                                    m.feed(off, masked)
                                bar.update(blen)
                                i += 1
                            root, leaves = m.finish()
                        except BaseException:
                            m.close()
                            raise
                    reserved = [{"offset": o, "length": n} for o, n in regions.spans()]
                    doc = CatalogDocument.build(
                        name, version,
                        VolumeInfo(size=vol.size, sector_size=src.sector_size, filesystem="ntfs",
                                   cluster_size=fm.cluster_size, partition_index=part.index,
                                   partition_offset=part.offset, partition_guid=uuid_str(part.guid),
                                   partition_type=uuid_str(part.type_guid), partition_name=part.name,
                                   disk_guid=uuid_str(table.disk_guid)),
                        block_size, leaves, root, FREE_NTFS, reserved=reserved)
                    der = sign_catalog(doc, signer, pss=pss)
                    vsc_path = None
                    if fmt == "vhdx":
                        dst.set_user_metadata(VSC_METADATA_GUID, der)  # type: ignore[attr-defined]
                    dst.flush()
                finally:
                    dst.close()
            finally:
                if vol is not os_view:
                    vol.close()
        if fmt == "raw":
            vsc_path = str(out_p) + ".vsc"
            write_bytes_atomic(vsc_path, der)
    finally:
        src.close()
    return ProtectResult(str(out_p), vsc_path, doc, der, signer.describe(), reserved, bytes_read,
                         time.perf_counter() - t0)
