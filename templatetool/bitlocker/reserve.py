"""Reserve BitLocker's regions inside an NTFS volume the way Windows does.

Windows keeps its FVE metadata and the relocated volume header in ordinary NTFS files, so the
filesystem never writes there: ``FVE2.{e40ad34d-dae9-4bc7-95bd-b16218c10f72}.1/.2/.3`` (64 KiB
each, metadata copies) and ``FVE2.{24e6f0ae-6a00-4f73-984b-75ce9942852d}`` (8 KiB, relocated
header) under ``System Volume Information``. We create the same zero-filled files offline with
ntfs-3g's ``ntfscp`` (no mount needed) and read back their cluster runs with dissect.ntfs; each
must be one contiguous, non-sparse run.

ntfs-3g's command-line tools cannot create folders; a volume made by ``mkntfs`` has no
``System Volume Information`` folder, so then the files go to the root folder (the names are the
same, NTFS still owns the clusters; Windows does not care where they are as long as nobody else
uses the clusters).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..blockdev import BlockDevice, DeviceIO, RawFile
from ..errors import FormatError, ResourceError, UnsupportedError
from . import structs as S
from .volume import FveRegions

#: File-name GUIDs Windows uses for the metadata copies and the relocated header.
METADATA_FILE_GUID = "{e40ad34d-dae9-4bc7-95bd-b16218c10f72}"
VHO_FILE_GUID = "{24e6f0ae-6a00-4f73-984b-75ce9942852d}"
SVI = "System Volume Information"
_NAME_RE = re.compile(r"^FVE2\.\{[0-9a-fA-F-]{36}\}(\.[123])?$")


def _ntfs_geometry(dev: BlockDevice) -> tuple[int, int]:
    head = dev.read(0, 512)
    if head[3:11] != b"NTFS    ":
        raise UnsupportedError(
            "the volume is not NTFS", dev.name, "BitLocker regions can only be reserved inside NTFS volumes"
        )
    bps = int.from_bytes(head[0x0B:0x0D], "little")
    spc = head[0x0D]
    if spc > 0x80:  # encoded as a negative power of two
        spc = 1 << (256 - spc)
    return bps, bps * spc


def find_reserved(view: BlockDevice) -> FveRegions | None:
    """Find existing FVE2 files (System Volume Information or root) and return their regions.

    Returns None when the volume has none of them; raises FormatError when they exist but are
    unusable (sparse, fragmented, resident or of the wrong size).
    """
    return _find_in(view, *_open_ntfs(view))


def _open_ntfs(view: BlockDevice) -> tuple[Any, int, int]:
    """(a dissect.ntfs NTFS (untyped), bytes per sector, cluster size) of ``view``."""
    try:
        from dissect.ntfs import NTFS
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ResourceError("dissect.ntfs is not installed", hint="pip install dissect.ntfs") from e
    bps, cluster = _ntfs_geometry(view)
    try:
        return NTFS(DeviceIO(view)), bps, cluster
    except Exception as e:
        raise FormatError(f"cannot read the NTFS volume: {e}", view.name) from None


def _find_in(view: BlockDevice, fs: Any, bps: int, cluster: int) -> FveRegions | None:
    found: dict[str, tuple[int, int]] = {}
    for folder in (SVI, ""):
        try:
            d = fs.mft.get("/" + folder if folder else "/")
            listing = d.listdir()
        except Exception:
            continue
        for name, entry in listing.items():
            if not _NAME_RE.match(name):
                continue
            suffix = name[-2:] if name[-2] == "." else ""
            if suffix in found:
                continue
            rec = entry.dereference()
            where = f"{view.name}: /{folder + '/' if folder else ''}{name}"
            try:
                runs = rec.dataruns()
                size = rec.size()
            except Exception as e:
                raise FormatError(f"cannot read the cluster runs: {e}", where) from None
            want = S.METADATA_REGION_SIZE if suffix else S.VHO_REGION_SIZE
            if rec.resident or size != want:
                raise FormatError(f"reserved file has {size} bytes (want {want}) or is resident", where)
            if len(runs) != 1 or runs[0][0] is None or runs[0][1] * cluster < want:
                raise FormatError(
                    "reserved file is not one contiguous, allocated run", where, "defragment or recreate it"
                )
            found[suffix] = (runs[0][0] * cluster, want)
    if not found:
        return None
    missing = [s or "(header)" for s in (".1", ".2", ".3", "") if s not in found]
    if missing:
        raise FormatError(
            f"incomplete BitLocker reservation: missing {', '.join(missing)}",
            view.name,
            "remove the FVE2 files or reserve again",
        )
    regions = FveRegions((found[".1"][0], found[".2"][0], found[".3"][0]), found[""][0], S.VHO_REGION_SIZE)
    for o, _ in regions.spans():
        if o % bps:
            raise FormatError(f"reserved region at {o:#x} is not sector aligned", view.name)
    return regions


def reserve_ntfs(raw_volume_path: str | os.PathLike[str]) -> FveRegions:
    """Reserve the four BitLocker regions inside the raw NTFS volume image (modified in place).

    Reuses an existing reservation. Needs ntfs-3g's ``ntfscp`` (ResourceError otherwise); ``-m``
    (minimal fragmentation) makes it allocate each file as one run where a long enough free run
    exists (without it, ntfs-3g fills small gaps first and the files come out fragmented).
    """
    path = Path(raw_volume_path)
    dev = RawFile(path)
    try:
        fs, bps, cluster = _open_ntfs(dev)  # parsed once: the existing reservation and the folder
        existing = _find_in(dev, fs, bps, cluster)
        if existing is not None:
            return existing
        if S.VHO_REGION_SIZE % bps:
            raise UnsupportedError(f"NTFS sector size {bps} is not supported", str(path))
        try:
            fs.mft.get("/" + SVI)
            folder = "/" + SVI + "/"
        except Exception:
            folder = "/"
    finally:
        dev.close()
    ntfscp = shutil.which("ntfscp")
    if ntfscp is None:
        raise ResourceError(
            "ntfs-3g's ntfscp is needed to reserve the BitLocker regions",
            str(path),
            "install the Debian package ntfs-3g",
        )
    names = [(f"FVE2.{METADATA_FILE_GUID}.{i}", S.METADATA_REGION_SIZE) for i in (1, 2, 3)]
    names.append((f"FVE2.{VHO_FILE_GUID}", S.VHO_REGION_SIZE))
    with tempfile.TemporaryDirectory(prefix="tt-reserve-") as td:
        for name, size in names:
            zf = Path(td) / f"zero{size}"
            if not zf.exists():
                zf.write_bytes(bytes(size))
            cp = subprocess.run(
                [ntfscp, "-q", "-m", str(path), str(zf), folder + name], capture_output=True, text=True, check=False
            )
            if cp.returncode != 0 and "No space" in (cp.stderr + cp.stdout):
                # -m preallocates outside the MFT zone; on a nearly full volume let ntfs-3g place it
                # anywhere (find_reserved below still insists on one contiguous run)
                cp = subprocess.run(
                    [ntfscp, "-q", str(path), str(zf), folder + name], capture_output=True, text=True, check=False
                )
            if cp.returncode != 0:
                msg = (cp.stderr or cp.stdout).strip().splitlines()
                raise ResourceError(
                    f"ntfscp could not create {name}: {msg[-1] if msg else cp.returncode}",
                    str(path),
                    "is the NTFS volume clean and has 256 KiB free?",
                )
    dev = RawFile(path)
    try:
        regions = find_reserved(dev)
    finally:
        dev.close()
    if regions is None:
        raise FormatError("the reserved files were not found after creating them", str(path))
    return regions
