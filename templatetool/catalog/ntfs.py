"""NTFS facts the catalog needs, read with dissect.ntfs (no hand parser).

* :func:`ntfs_free_map` — the $Bitmap as a :class:`FreeMap` (which clusters are in use);
* :func:`files_in_ranges` — which files own clusters inside given byte ranges (localising a change).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..blockdev import BlockDevice, DeviceIO
from ..errors import FormatError


@dataclass
class FreeMap:
    """Which clusters of a volume are in use: ``used[i]`` for the cluster at ``i*cluster_size``.

    Bytes beyond ``len(used) * cluster_size`` (e.g. NTFS's backup boot sector) count as used.
    """

    cluster_size: int
    used: np.ndarray  # dtype=bool

    @property
    def cluster_count(self) -> int:
        return int(self.used.shape[0])

    @property
    def free_clusters(self) -> int:
        return int(self.cluster_count - int(np.count_nonzero(self.used)))

    def used_in(self, offset: int, length: int) -> np.ndarray | None:
        """Per-cluster used flags for an aligned span, or None when the span is beyond the map."""
        cs = self.cluster_size
        first = offset // cs
        if first >= self.cluster_count:
            return None
        last = min(self.cluster_count, (offset + length + cs - 1) // cs)
        return self.used[first:last]


def _open_ntfs(view: BlockDevice):  # type: ignore[no-untyped-def]
    from dissect.ntfs import NTFS

    try:
        return NTFS(DeviceIO(view))
    except Exception as e:  # noqa: BLE001 - dissect raises several untyped errors
        raise FormatError(f"cannot read the NTFS volume: {e}", view.name) from None


def ntfs_free_map(view: BlockDevice) -> FreeMap:
    """Read $Bitmap (bit i, LSB first = cluster i in use) into a FreeMap."""
    fs = _open_ntfs(view)
    cs = fs.cluster_size
    try:
        clusters = int(fs.boot_sector.NumberSectors) * fs.sector_size // cs
        raw = fs.mft.get("$Bitmap").open().read()
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"cannot read the NTFS $Bitmap: {e}", view.name) from None
    if len(raw) * 8 < clusters:
        raise FormatError("the NTFS $Bitmap is shorter than the volume", view.name,
                          "run chkdsk (or ntfsfix) on the volume")
    if clusters * cs > view.size:
        raise FormatError("the NTFS volume is larger than its partition", view.name)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:clusters]
    return FreeMap(cs, bits.astype(bool))


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
            if rec.header.BaseFileRecordSegment.SegmentNumberLowPart or rec.header.BaseFileRecordSegment.SegmentNumberHighPart:
                continue  # extension record: its attributes are listed under the base record
            attrs = rec.attributes
        except Exception:  # noqa: BLE001 - skip unreadable records
            continue
        for collection in attrs.values():
            for attr in collection:
                try:
                    if attr.header.resident:
                        continue
                    runs = attr.dataruns()
                except Exception:  # noqa: BLE001
                    continue
                for lcn, count in runs:
                    if lcn is None:
                        continue
                    h = hit(lcn, count)
                    if h is None:
                        continue
                    try:
                        path = rec.full_path() or rec.filename or f"<record {rec.segment}>"
                    except Exception:  # noqa: BLE001
                        path = f"<record {rec.segment}>"
                    key = (rec.segment or 0, attr.header.type.name)
                    if key in seen:
                        break
                    seen.add(key)
                    out.append({"path": path.replace("\\", "/"), "record": rec.segment,
                                "attribute": attr.header.type.name, "name": attr.name or "",
                                "offset": h[0], "length": h[1] - h[0]})
                    if len(out) >= limit:
                        return out
                    break
    return out
