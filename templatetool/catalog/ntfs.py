"""NTFS facts the catalog needs, read with dissect.ntfs (no hand parser).

* :func:`ntfs_free_map` — the $Bitmap as a :class:`FreeMap` (which clusters are in use);
* :func:`files_in_ranges` — which files own clusters inside given byte ranges (localising a change).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..blockdev import BlockDevice, DeviceIO
from ..errors import FormatError

_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


class FreeMap:
    """Which clusters of a volume are in use, kept as NTFS keeps it: one bit per cluster (LSB
    first), so a 127 GiB volume of 4 KiB clusters costs 4 MiB, not 32.

    ``used_in(offset, length)`` gives the flags of a span; bytes beyond ``cluster_count *
    cluster_size`` (e.g. NTFS's backup boot sector) count as used. ``FreeMap(cs, bools)`` builds
    one from a boolean array; :meth:`from_packed` from $Bitmap bytes.
    """

    def __init__(self, cluster_size: int, used: np.ndarray | None = None) -> None:
        self.cluster_size = cluster_size
        flags = np.zeros(0, dtype=bool) if used is None else np.asarray(used, dtype=bool)
        self.cluster_count = int(flags.shape[0])
        self.packed = np.packbits(flags, bitorder="little")

    @classmethod
    def from_packed(cls, cluster_size: int, packed: bytes, count: int) -> FreeMap:
        """From ``count`` bits of a packed little-endian bitmap (extra bits are ignored)."""
        fm = cls(cluster_size)
        arr = np.frombuffer(packed, dtype=np.uint8, count=(count + 7) // 8).copy()
        if count % 8:
            arr[-1] &= (1 << (count % 8)) - 1
        fm.packed, fm.cluster_count = arr, count
        return fm

    @property
    def used(self) -> np.ndarray:
        """All flags as a bool array (one byte per cluster: for tests and small volumes)."""
        return np.unpackbits(self.packed, bitorder="little", count=self.cluster_count).astype(bool)

    @property
    def free_clusters(self) -> int:
        return int(self.cluster_count - int(_POPCOUNT[self.packed].sum(dtype=np.int64)))

    def used_in(self, offset: int, length: int) -> np.ndarray | None:
        """Per-cluster used flags for an aligned span, or None when the span is beyond the map."""
        cs = self.cluster_size
        first = offset // cs
        if first >= self.cluster_count:
            return None
        last = min(self.cluster_count, (offset + length + cs - 1) // cs)
        b0 = first // 8
        bits = np.unpackbits(self.packed[b0 : (last + 7) // 8], bitorder="little")
        return bits[first - 8 * b0 : last - 8 * b0].astype(bool)

    def all_free(self, offset: int, length: int) -> bool | None:
        """True when ``offset`` is cluster-aligned, the span lies inside the map and every cluster
        it touches is free; None when it starts beyond the map. The same answer as testing
        :meth:`used_in`, without building arrays (one call per in-place step)."""
        cs = self.cluster_size
        first = offset // cs
        if first >= self.cluster_count:
            return None
        last = (offset + length + cs - 1) // cs  # exclusive
        if offset % cs or length <= 0 or last > self.cluster_count:
            return False
        p = self.packed
        b0, b1 = first // 8, (last - 1) // 8
        lo, hi = first % 8, last - 8 * b1  # bits [lo, 8) of byte b0 ... bits [0, hi) of byte b1
        if b0 == b1:
            return not int(p[b0]) & (((1 << (hi - lo)) - 1) << lo)
        if int(p[b0]) >> lo or int(p[b1]) & ((1 << hi) - 1):
            return False
        return not p[b0 + 1 : b1].any()

    def any_used_per(self, clusters: int, n: int) -> np.ndarray | None:
        """For each of the first ``n`` runs of ``clusters`` clusters (a multiple of 8): whether
        any is used (runs past the map count as used); None when ``clusters`` is not a multiple of 8."""
        if clusters <= 0 or clusters % 8:
            return None
        per = clusters // 8
        inside = min(n, self.cluster_count // clusters)
        out = np.ones(n, dtype=bool)
        out[:inside] = self.packed[: inside * per].reshape(inside, per).any(axis=1)
        return out


def _open_ntfs(view: BlockDevice) -> Any:  # a dissect.ntfs NTFS (dissect.ntfs is untyped)
    from dissect.ntfs import NTFS

    from ..disk.fs import FS_BITLOCKER, sniff_filesystem

    fs = sniff_filesystem(view)
    if fs == FS_BITLOCKER:
        raise FormatError(
            "the volume is BitLocker-encrypted, not plain NTFS (a shielded VM disk?)",
            view.name,
            "use the protected template (or decrypt the disk first)",
        )
    try:
        return NTFS(DeviceIO(view))
    except Exception as e:
        raise FormatError(f"cannot read the NTFS volume: {e}", view.name) from None


def ntfs_free_map(view: BlockDevice) -> FreeMap:
    """Read $Bitmap (bit i, LSB first = cluster i in use) into a FreeMap.

    FormatError when NTFS or its $Bitmap cannot be read, is shorter than the volume, or calls
    the boot sector's or the $MFT's clusters free (a damaged bitmap must never drive a skip)."""
    fs = _open_ntfs(view)
    cs = fs.cluster_size
    try:
        clusters = int(fs.boot_sector.NumberSectors) * fs.sector_size // cs
        raw = fs.mft.get("$Bitmap").open().read()
    except Exception as e:
        raise FormatError(f"cannot read the NTFS $Bitmap: {e}", view.name) from None
    if len(raw) * 8 < clusters:
        raise FormatError(
            "the NTFS $Bitmap is shorter than the volume", view.name, "run chkdsk (or ntfsfix) on the volume"
        )
    if clusters * cs > view.size:
        raise FormatError("the NTFS volume is larger than its partition", view.name)
    fm = FreeMap.from_packed(cs, raw, clusters)
    # A $Bitmap that calls the boot sector's or the $MFT's own clusters free is damaged: trusting
    # it would treat live data as free space.
    mft = int(fs.boot_sector.MftStartLcn)
    for what, lcn in (("boot sector", 0), ("$MFT", mft)):
        flags = fm.used_in(lcn * cs, cs)
        if flags is None or not flags.any():
            raise FormatError(
                f"the NTFS $Bitmap marks the {what} (cluster {lcn}) free",
                view.name,
                "run chkdsk (or ntfsfix) on the volume",
            )
    return fm


def files_in_ranges(view: BlockDevice, ranges: Iterable[tuple[int, int]], limit: int = 200) -> list[dict[str, object]]:
    """Files (paths, attribute) with clusters inside any of ``ranges`` (byte offset, length).

    Walks every in-use MFT record's non-resident attributes with dissect.ntfs. Resident data
    lives in the $MFT itself, so a change there reports $MFT. Returns at most ``limit`` entries.
    """
    spans = sorted((o, o + n) for o, n in ranges)
    if not spans:
        return []
    fs = _open_ntfs(view)
    cs = fs.cluster_size
    out: list[dict[str, object]] = []
    seen: set[tuple[int, str]] = set()

    def hit(lcn: int, count: int) -> tuple[int, int] | None:
        a, b = lcn * cs, (lcn + count) * cs
        for s, e in spans:
            if a < e and s < b:
                return max(a, s), min(b, e)
        return None

    for rec in fs.mft.segments():
        try:
            if not (rec.header.Flags & 0x0001):  # FILE_RECORD_SEGMENT_IN_USE
                continue
            if (
                rec.header.BaseFileRecordSegment.SegmentNumberLowPart
                or rec.header.BaseFileRecordSegment.SegmentNumberHighPart
            ):
                continue  # extension record: its attributes are listed under the base record
            attrs = rec.attributes
        except Exception:
            continue
        for collection in attrs.values():
            for attr in collection:
                try:
                    if attr.header.resident:
                        continue
                    runs = attr.dataruns()
                except Exception:
                    continue
                for lcn, count in runs:
                    if lcn is None:
                        continue
                    h = hit(lcn, count)
                    if h is None:
                        continue
                    try:
                        path = rec.full_path() or rec.filename or f"<record {rec.segment}>"
                    except Exception:
                        path = f"<record {rec.segment}>"
                    key = (rec.segment or 0, attr.header.type.name)
                    if key in seen:
                        break
                    seen.add(key)
                    out.append(
                        {
                            "path": path.replace("\\", "/"),
                            "record": rec.segment,
                            "attribute": attr.header.type.name,
                            "name": attr.name or "",
                            "offset": h[0],
                            "length": h[1] - h[0],
                        }
                    )
                    if len(out) >= limit:
                        return out
                    break
    return out
