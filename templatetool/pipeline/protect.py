"""Protect a golden disk: preflight, reserve BitLocker's regions, copy + measure, sign, embed.

The reservation is made with ntfscp in a sparse overlay holding only the OS volume's NTFS
metadata (:mod:`templatetool.disk.overlay`); the copy reads that overlay over the source, so the
file data is read once (measured and written in the same pass) and never staged.

``protect`` never edits its input: it writes a new disk (VHDX when the output name ends in
``.vhdx``; a raw image otherwise, with the signed catalog beside it as ``OUT.vsc``), atomically.
Free clusters of the OS volume are written as zeros in the output, so the output volume is
byte-for-byte what the catalog measured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_outputs, no_interrupts, write_bytes_atomic
from ..blockdev import CHUNK, BlockDevice, is_zero
from ..catalog import DEFAULT_BLOCK_SIZE, VSC_METADATA_GUID
from ..catalog.document import CatalogDocument, VolumeInfo, parse_version, uuid_str
from ..catalog.measure import FREE_NTFS, Measurer
from ..catalog.ntfs import ntfs_free_map
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
            "output": self.output,
            "vsc": self.vsc_path,
            "name": d.name,
            "version": d.version_str,
            "signer": self.signer,
            "root": d.root.hex(),
            "block_size": d.block_size,
            "block_count": d.block_count,
            "volume": d.volume.to_json(),
            "reserved": self.reserved,
            "catalog_bytes": len(self.der),
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }


def _needed_clusters(cluster_size: int) -> int:
    return sum((n + cluster_size - 1) // cluster_size * k for n, k in ((65536, 3), (8192, 1)))


def _os_candidates(table: Any, dev: BlockDevice) -> Any:
    """The partition meant as OS volume: the largest basic-data (GPT) / data (MBR) partition."""
    from ..disk import sniff_filesystem

    kinds = ("basic-data", "other", "fat32", "fat16")
    cands = [p for p in table.partitions if p.kind in kinds]
    # The same choice protect makes (disk.find_os_volume: largest NTFS/BitLocker data partition);
    # failing that, the largest data partition, so its filesystem can be reported.
    ntfs = [p for p in cands if sniff_filesystem(p.view(dev)) in ("ntfs", "bitlocker")]
    pool = ntfs or cands
    return max(pool, key=lambda p: p.size) if pool else None


def _open_failure(path: str) -> str | None:
    """Why a disk failed to open, from its structure (never from an error's wording): ``log``
    (a VHDX whose log holds unreplayed entries), ``differencing`` (a VHDX with a parent, which
    failed to open alongside it) or None (anything else)."""
    from ..disk import disk_format
    from ..vhdx.layout import Reporter, Stop, parse_layout

    try:
        if disk_format(path) != "vhdx":
            return None
        fd = os.open(path, os.O_RDONLY)
    except (OSError, TemplateToolError):
        return None
    rep = Reporter(path, collect=True)
    try:
        has_parent = parse_layout(fd, rep).has_parent
    except (Stop, OSError, TemplateToolError):
        has_parent = False
    finally:
        os.close(fd)
    if any(f.severity == "error" and f.where == "log" for f in rep.findings):
        return "log"
    return "differencing" if has_parent else None


def preflight(disk_path: str | os.PathLike[str]) -> list[Problem]:
    """Check everything ``protect`` needs; return ALL problems found (empty list: ready)."""
    from ..bitlocker.reserve import find_reserved
    from ..disk import open_disk, read_partition_table, sniff_filesystem

    path = str(disk_path)
    probs: list[Problem] = []
    try:
        dev = open_disk(path)
    except TemplateToolError as e:
        why = _open_failure(path)
        if why == "log":
            return [
                Problem(
                    "log",
                    f"the VHDX has a pending log: {e}",
                    "replay it (qemu-img check -r all FILE, or attach it once in Hyper-V)",
                )
            ]
        if why == "differencing":
            return [
                Problem(
                    "differencing",
                    f"the disk is a differencing disk and cannot be opened alone: {e}",
                    "merge it into a standalone disk first (e.g. qemu-img convert or Merge-VHD)",
                )
            ]
        return [Problem("open", f"cannot open the disk: {e}", "give a readable VHDX or raw disk image")]
    try:
        parent = getattr(dev, "parent", None)
        subformat = getattr(dev, "subformat", None)
        if parent is not None or subformat == "differencing" or path.lower().endswith(".avhdx"):
            probs.append(
                Problem(
                    "differencing",
                    "the disk is a differencing disk (it has a parent)",
                    "merge it into a standalone disk first (e.g. qemu-img convert or Merge-VHD)",
                )
            )
        try:
            table = read_partition_table(dev)
        except TemplateToolError as e:
            probs.append(
                Problem(
                    "partition-table",
                    f"cannot read the partition table: {e}",
                    "the disk needs a valid GPT partition table",
                )
            )
            return probs
        if table.scheme != "gpt":
            what = "the disk has an MBR partition table" if table.scheme == "mbr" else "the disk has no partition table"
            probs.append(
                Problem("not-gpt", what, "use a GPT disk (generation 2 VM; convert with MBR2GPT or sgdisk -g)")
            )
        if any(p.kind in ("ldm-metadata", "ldm-data") for p in table.partitions):
            probs.append(
                Problem(
                    "dynamic-disk",
                    "the disk is a Windows dynamic disk (LDM)",
                    "convert it to a basic disk; BitLocker does not support dynamic disks",
                )
            )
        if table.scheme is not None and not any(p.kind == "efi-system" for p in table.partitions):
            probs.append(
                Problem(
                    "no-boot-partition",
                    "the disk has no EFI system (boot) partition",
                    "the OS volume is encrypted: the boot loader needs its own unencrypted partition",
                )
            )
        osp = _os_candidates(table, dev) if table.scheme is not None else None
        if osp is None:
            if table.scheme is not None:
                probs.append(
                    Problem(
                        "no-os-volume",
                        "no basic-data partition to serve as OS volume",
                        "the disk needs an NTFS OS partition",
                    )
                )
            return probs
        view = osp.view(dev)
        fs = sniff_filesystem(view)
        if fs in ("bitlocker", "bitlocker-to-go"):
            probs.append(
                Problem(
                    "bitlocker",
                    f"the OS volume (partition {osp.index}) is already BitLocker-encrypted",
                    "protect the unencrypted golden disk (decrypt it first)",
                )
            )
            return probs
        if fs != "ntfs":
            probs.append(
                Problem(
                    "not-ntfs",
                    f"the OS volume (partition {osp.index}) is {fs or 'not a known filesystem'}, not NTFS",
                    "format the OS volume with NTFS; BitLocker needs NTFS",
                )
            )
            return probs
        try:
            reserved = find_reserved(view)
        except TemplateToolError as e:
            probs.append(
                Problem(
                    "bad-reservation",
                    f"unusable BitLocker reservation: {e}",
                    "remove the FVE2.* files from the OS volume and try again",
                )
            )
            reserved = None
        if reserved is None:
            try:
                fm = ntfs_free_map(view)
            except TemplateToolError as e:
                probs.append(Problem("ntfs", f"cannot read the NTFS volume: {e}", "run chkdsk /f on it"))
                return probs
            need = _needed_clusters(fm.cluster_size)
            if fm.free_clusters < need:
                probs.append(
                    Problem(
                        "no-room",
                        f"the OS volume has {fm.free_clusters * fm.cluster_size} bytes free, BitLocker needs "
                        f"{need * fm.cluster_size} (3 x 64 KiB + 8 KiB in whole clusters)",
                        "free some space on the OS volume or extend the partition",
                    )
                )
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


class _Staged:
    """The OS volume ready to measure: BitLocker's regions reserved (in a sparse metadata overlay
    over the source when they had to be created: no copy of the file data), its free map, and
    where the bytes come from."""

    def __init__(self, os_view: BlockDevice, workdir: Path, sector_size: int) -> None:
        from ..bitlocker.reserve import find_reserved, reserve_ntfs
        from ..disk.overlay import MetadataOverlay

        self.os_view = os_view
        self.bytes_read = 0
        self.overlay: MetadataOverlay | None = None
        regions = find_reserved(os_view)
        self.staged = regions is None
        self.vol: BlockDevice = os_view
        if regions is None:
            # ntfscp works on a raw volume file: give it a sparse copy of the NTFS metadata only,
            # then read that copy over the source (disk/overlay.py)
            self.overlay = MetadataOverlay(os_view, workdir)
            try:
                self.bytes_read += self.overlay.bytes_read
                regions = reserve_ntfs(self.overlay.path)
                self.vol = self.overlay.merged(sector_size=sector_size)
            except BaseException:
                self.overlay.close()
                raise
        self.regions = regions
        try:
            self.free_map = ntfs_free_map(self.vol)
        except BaseException:
            self.close()
            raise

    def in_overlay(self, offset: int, length: int) -> bool:
        """Whether the span touches the overlay (where the reservation may have changed bytes)."""
        from ..disk.overlay import MergedVolume

        return isinstance(self.vol, MergedVolume) and self.vol.in_overlay(offset, length)

    def close(self) -> None:
        if self.overlay is not None:
            self.vol.close()
            self.overlay.close()


def _measure_and_write(
    st: _Staged, block_size: int, workers: int | None, bar: Any, write: Any
) -> tuple[bytes, list[bytes]]:
    """One pass over the volume: measure (free clusters as zeros) and hand each chunk of blocks
    read to ``write(offset, masked, all_zero)``; chunks whose clusters are all free are never
    read (nor handed over).

    Forked workers (:func:`templatetool.parallel.ordered_map`) read a chunk, zero its free
    clusters in place and hash its blocks; this process records the digests in order and is the
    single writer (as for encrypt: two processes writing one file contend on its inode lock).
    """
    import numpy as np

    from ..parallel import chunk_items, ordered_map

    fm, vol = st.free_map, st.vol
    cs = fm.cluster_size
    step = block_size * max(1, CHUNK // block_size)
    m = Measurer(vol.size, block_size, None, 1)
    nsteps = -(-vol.size // step)

    def all_free(off: int, n: int) -> bool:
        used = fm.used_in(off, n)
        return used is not None and used.shape[0] * cs >= n and not used.any()

    def chunk_mask(chunk: int) -> Any:
        full = vol.size // chunk
        any_used = fm.any_used_per(chunk // cs, full) if chunk % cs == 0 else None
        if any_used is None:
            return None
        out = np.zeros(nsteps, dtype=bool)
        out[:full] = ~any_used
        return out

    all_free.chunk_mask = chunk_mask  # type: ignore[attr-defined]

    def work(off: int, n: int, out: memoryview) -> bytes:
        # in a worker: read, zero the free clusters, hash the blocks; flag an all-zero chunk
        data = out[:n]
        vol.read_into(off, data)
        used = fm.used_in(off, n)
        if used is not None and not used.all():
            arr = np.frombuffer(data, dtype=np.uint8)
            full = min(n, used.shape[0] * cs) // cs
            arr[: full * cs].reshape(full, cs)[~used[:full]] = 0
        return m.block_digests(off, data) + (b"\0" if is_zero(data) else b"\1")

    try:
        for off, n, out, payload in ordered_map(work, chunk_items(vol.size, step, all_free), workers, slot=step):
            if out is None:
                m.feed_zeros(off, n)
            else:
                assert payload is not None
                m.accept_digests(off, n, payload[:-1])
                st.bytes_read += n
                write(off, out[:n], payload[-1:] == b"\0")
            bar.update(n)
        return m.finish()
    except BaseException:
        m.close()
        raise


def _document(
    st: _Staged,
    part: Any,
    table: Any,
    sector_size: int,
    name: str,
    version: str,
    block_size: int,
    root: bytes,
    leaves: list[bytes],
) -> CatalogDocument:
    fm = st.free_map
    return CatalogDocument.build(
        name,
        version,
        VolumeInfo(
            size=st.vol.size,
            sector_size=sector_size,
            filesystem="ntfs",
            cluster_size=fm.cluster_size,
            partition_index=part.index,
            partition_offset=part.offset,
            partition_guid=uuid_str(part.guid),
            partition_type=uuid_str(part.type_guid),
            partition_name=part.name,
            disk_guid=uuid_str(table.disk_guid),
        ),
        block_size,
        leaves,
        root,
        FREE_NTFS,
        reserved=[{"offset": o, "length": n} for o, n in st.regions.spans()],
    )


def _sign_into(dev: BlockDevice, fmt: str, doc: CatalogDocument, signer: Signer, pss: bool) -> bytes:
    """Sign ``doc``; embed the catalog in ``dev``'s metadata when it is a VHDX; flush ``dev``.
    Return the catalog's DER (a raw disk's caller writes it beside the disk)."""
    der = sign_catalog(doc, signer, pss=pss)
    if fmt == "vhdx":
        dev.set_user_metadata(VSC_METADATA_GUID, der)  # type: ignore[attr-defined]
    dev.flush()
    return der


def _result(
    output: str, vsc_path: str | None, doc: CatalogDocument, der: bytes, signer: Signer, st: _Staged, t0: float
) -> ProtectResult:
    """The ``ProtectResult`` of a finished protect pass over the staged volume ``st``."""
    return ProtectResult(
        output,
        vsc_path,
        doc,
        der,
        signer.describe(),
        [{"offset": o, "length": n} for o, n in st.regions.spans()],
        st.bytes_read,
        time.perf_counter() - t0,
    )


@contextlib.contextmanager
def _scratch_dir(parent: Path) -> Iterator[str]:
    """A scratch folder beside the output, removed at the end (also when interrupted at any point)."""
    td = None
    try:
        with no_interrupts():
            td = tempfile.mkdtemp(prefix=".tt-protect-", dir=parent if str(parent) else ".")
        yield td
    finally:
        if td is not None:
            with no_interrupts():  # a Ctrl-C landing now must not leave half a scratch folder
                shutil.rmtree(td, ignore_errors=True)


def protect(
    golden_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None,
    name: str,
    version: str,
    signer: Signer,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    pss: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    in_place: bool = False,
    subformat: str | None = None,
) -> ProtectResult:
    """Make a signed template disk from ``golden_path`` at ``out_path``.

    By default the input is never modified: a new disk is written atomically (VHDX when
    ``out_path`` ends in .vhdx, else raw + ``OUT.vsc``), with the OS volume's free clusters
    zeroed. ``in_place=True`` (explicit, not atomic) instead adds the BitLocker reservation and
    the catalog to ``golden_path`` itself, leaving free clusters as they are.
    ``subformat`` (fixed|dynamic) of a VHDX output; default: the input's (a fixed VHDX stays fixed).
    """
    from ..disk import create_disk, find_os_volume, open_disk, output_subformat, read_partition_table

    t0 = time.perf_counter()
    parse_version(version)
    src_p = Path(golden_path)
    if in_place:
        if out_path is not None and Path(out_path).resolve() != src_p.resolve():
            raise UsageError("--in-place modifies the input; do not also give an output", str(out_path))
        if subformat is not None:
            raise UsageError("--subformat needs a new output disk; --in-place keeps the input's")
        out_p = src_p
    else:
        if out_path is None:
            raise UsageError(
                "no output given", hint="give an output path (or protect in place)", code="protect.no-output"
            )
        out_p = Path(out_path)
        if out_p.exists() and src_p.exists() and os.path.samefile(src_p, out_p):
            raise UsageError(
                "the output is the input",
                str(out_p),
                "protect writes a new disk; choose another name (or protect in place deliberately)",
                code="protect.output-is-input",
            )
        if out_p.exists() and not overwrite:
            raise UsageError(
                "output exists", str(out_p), "choose another name, or allow overwriting it", code="output.exists"
            )
    problems = preflight(src_p)
    if problems:
        raise PolicyError(
            f"{len(problems)} preflight problem(s): " + " | ".join(str(p) for p in problems),
            str(src_p),
            "run the preflight check for the list",
            code="protect.preflight",
        )
    if in_place:
        return _protect_in_place(src_p, name, version, signer, block_size, pss, workers, t0)
    fmt = "vhdx" if out_p.name.lower().endswith(".vhdx") else "raw"
    src = open_disk(src_p)
    vsc_path = None
    try:
        sub = output_subformat(src, subformat, fmt)
        table = read_partition_table(src)
        part = find_os_volume(table, src)
        # the disk and (raw) its OUT.vsc appear together or not at all (also on Ctrl-C)
        with atomic_outputs() as outs, _scratch_dir(out_p.parent) as td:
            tmp_out = outs.add(out_p, 0o644)
            st = _Staged(part.view(src), Path(td), src.sector_size)
            try:
                if block_size % st.free_map.cluster_size:
                    raise UsageError(
                        f"block size {block_size} is not a multiple of the cluster size {st.free_map.cluster_size}"
                    )
                dst = create_disk(tmp_out, src.size, like=src, fmt=fmt, subformat=sub)
                try:

                    def write(off: int, masked: memoryview, zero: bool) -> None:
                        if not zero:
                            dst.write(part.offset + off, masked)

                    with progress(src.size, "writing template") as bar:
                        st.bytes_read += _copy_outside(src, dst, (part.offset, part.size), bar)
                        root, leaves = _measure_and_write(st, block_size, workers, bar, write)
                    doc = _document(st, part, table, src.sector_size, name, version, block_size, root, leaves)
                    der = _sign_into(dst, fmt, doc, signer, pss)
                finally:
                    dst.close()
            finally:
                st.close()
            if fmt == "raw":
                vsc_path = str(out_p) + ".vsc"
                outs.write(vsc_path, der)
    finally:
        src.close()
    return _result(str(out_p), vsc_path, doc, der, signer, st, t0)


def _protect_in_place(
    path: Path, name: str, version: str, signer: Signer, block_size: int, pss: bool, workers: int | None, t0: float
) -> ProtectResult:
    from ..disk import disk_format, find_os_volume, open_disk, read_partition_table

    fmt = disk_format(path)
    dev = open_disk(path, writable=True)
    vsc_path = None
    try:
        table = read_partition_table(dev)
        part = find_os_volume(table, dev)
        os_view = part.view(dev)
        with tempfile.TemporaryDirectory(prefix=".tt-protect-", dir=path.parent) as td:
            st = _Staged(os_view, Path(td), dev.sector_size)
            try:
                if block_size % st.free_map.cluster_size:
                    raise UsageError(
                        f"block size {block_size} is not a multiple of the cluster size {st.free_map.cluster_size}"
                    )

                def write(off: int, masked: memoryview, zero: bool) -> None:
                    # Only what the reservation changed goes back (chunks touching the overlay,
                    # unmasked, where they differ); free clusters stay as they are.
                    n = len(masked)
                    if st.in_overlay(off, n):
                        data = st.vol.read(off, n)
                        if os_view.read(off, n) != data:
                            os_view.write(off, data)

                with progress(os_view.size, "protecting in place") as bar:
                    root, leaves = _measure_and_write(st, block_size, workers, bar, write)
                doc = _document(st, part, table, dev.sector_size, name, version, block_size, root, leaves)
                der = _sign_into(dev, fmt, doc, signer, pss)
            finally:
                st.close()
    finally:
        dev.close()
    if fmt != "vhdx":
        vsc_path = str(path) + ".vsc"
        write_bytes_atomic(vsc_path, der)
    return _result(str(path), vsc_path, doc, der, signer, st, t0)
