"""A sparse NTFS metadata overlay: change a volume's filesystem without copying its file data.

``encrypt`` and ``protect`` must add BitLocker's reservation files to an NTFS volume they may
not modify. ntfs-3g's ``ntfscp`` (see :mod:`templatetool.bitlocker.reserve`) only reads and
writes NTFS *metadata* (boot sector, $MFT, $MFTMirr, $LogFile, $Volume, $AttrDef, $Bitmap,
$UpCase, $Secure, directory indexes) and the clusters of the files it creates, which it takes
from free space. So instead of a full temporary copy of the volume:

1. :func:`metadata_extents` lists every cluster run that is not the ``$DATA`` of an ordinary
   file (MFT record 24 or later, by base record): the non-resident attributes of the system
   records 0-23 (all of them, $MFT's own data included) and the non-``$DATA`` non-resident
   attributes of every other in-use record (directory indexes and bitmaps, attribute lists,
   reparse/EA data), plus any bytes past NTFS's cluster map (the backup boot sector);
2. :class:`MetadataOverlay` copies those runs (rounded out to the overlay file's block size,
   all-zero pieces left as holes) into a sparse temporary file the size of the volume (0600,
   beside the output); ntfscp then runs on that file;
3. :class:`MergedVolume` reads the result: the overlay's data extents (``SEEK_DATA`` /
   ``SEEK_HOLE``: the metadata copied plus everything ntfscp wrote) where present, the source
   elsewhere. The overlay holds metadata only; the file data is read once, by the pass that
   encrypts or measures it.

The merged view reads exactly what a full copy of the volume modified by ntfscp would hold:
every block ntfscp wrote is allocated in the overlay, and a partly written block holds the
source's bytes around the write: the copy is block-granular (a block is either a full copy of
the source or a hole) and ntfscp writes only metadata and clusters it allocates from free
space. With clusters of the file's block size or larger (4 KiB, the NTFS default) a free
cluster is whole blocks; with smaller clusters every block holding a free cluster is copied too
(free space is then read, and non-zero free space copied). With ``zero_free_chunks`` the
view also treats 1 MiB chunks that are free in NTFS and all zeros in the source as unallocated
(what a copy that leaves zero chunks as holes reports), so the sparse decision of the pass is the
same as for such a copy.

The MFT is scanned with a small loop over ``struct`` formats (the construct declarations below
are the reference layout and are checked against them in the tests): construct's compiled
parser costs 4.5 µs per header against 0.1 µs, i.e. seconds for a Windows volume's 200k records.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from ..blockdev import CHUNK, BlockDevice, DeviceIO, RawFile, is_zero
from ..errors import FormatError, ResourceError, UnsupportedError

#: The FILE record header (NTFS 3.1), as far as the scan needs it.
FILE_RECORD_HEADER = Struct(
    "magic" / Bytes(4),
    "usa_offset" / Int16ul,
    "usa_count" / Int16ul,
    "lsn" / Int64ul,
    "sequence" / Int16ul,
    "link_count" / Int16ul,
    "attrs_offset" / Int16ul,
    "flags" / Int16ul,
    "bytes_in_use" / Int32ul,
    "bytes_allocated" / Int32ul,
    "base_reference" / Int64ul,
)
#: The common attribute header.
ATTRIBUTE_HEADER = Struct(
    "type" / Int32ul,
    "length" / Int32ul,
    "non_resident" / Int8ul,
    "name_length" / Int8ul,
    "name_offset" / Int16ul,
    "flags" / Int16ul,
    "instance" / Int16ul,
)
#: The non-resident part that follows it (up to the mapping pairs offset).
NONRESIDENT_HEADER = Struct(
    "lowest_vcn" / Int64ul,
    "highest_vcn" / Int64ul,
    "mapping_pairs_offset" / Int16ul,
)

_REC = struct.Struct("<4sHHQHHHHIIQ")
_ATTR = struct.Struct("<IIBBHHH")
_NONRES_MP = struct.Struct("<H")  # mapping_pairs_offset at attribute offset 32
_END = 0xFFFFFFFF
_DATA = 0x80
_IN_USE = 0x0001
#: First MFT record of an ordinary file (0-15 are system files, 16-23 reserved).
FIRST_USER_RECORD = 24
_FIXUP_STRIDE = 512


def _mapping_pairs(buf: bytes | bytearray | memoryview, pos: int, end: int) -> list[tuple[int, int]]:
    """Decode NTFS mapping pairs into (lcn, count) runs; sparse runs are left out."""
    runs: list[tuple[int, int]] = []
    lcn = 0
    while pos < end:
        head = buf[pos]
        if head == 0:
            break
        nlen, olen = head & 0x0F, head >> 4
        pos += 1
        if nlen == 0 or pos + nlen + olen > end:
            raise FormatError("malformed NTFS mapping pairs")
        count = int.from_bytes(buf[pos : pos + nlen], "little", signed=True)
        pos += nlen
        if olen:
            lcn += int.from_bytes(buf[pos : pos + olen], "little", signed=True)
            pos += olen
            if count <= 0 or lcn < 0:
                raise FormatError("malformed NTFS mapping pairs (negative cluster)")
            runs.append((lcn, count))
    return runs


def _apply_fixups(rec: bytearray, where: str) -> None:
    usa_off, usa_count = struct.unpack_from("<HH", rec, 4)
    if usa_count == 0:
        return
    if usa_off + 2 * usa_count > len(rec) or (usa_count - 1) * _FIXUP_STRIDE > len(rec):
        raise FormatError("MFT record has a bad update sequence array", where, "run chkdsk /f on the volume")
    usn = rec[usa_off : usa_off + 2]
    for i in range(1, usa_count):
        p = i * _FIXUP_STRIDE - 2
        if rec[p : p + 2] != usn:
            raise FormatError("MFT record is torn (update sequence mismatch)", where, "run chkdsk /f on the volume")
        rec[p : p + 2] = rec[usa_off + 2 * i : usa_off + 2 * i + 2]


def _record_runs(rec: bytearray, number: int, where: str) -> list[tuple[int, int]]:
    """The cluster runs of one in-use MFT record that belong to the metadata set."""
    magic, _, _, _, _, _, attrs_off, flags, in_use, _, base = _REC.unpack_from(rec, 0)
    if magic != b"FILE" or not flags & _IN_USE:
        return []
    _apply_fixups(rec, where)
    owner = base & 0xFFFFFFFFFFFF or number
    user = owner >= FIRST_USER_RECORD
    end = min(in_use, len(rec))
    pos = attrs_off
    runs: list[tuple[int, int]] = []
    while pos + 8 <= end:
        atype, alen = struct.unpack_from("<II", rec, pos)
        if atype == _END:
            break
        if alen < 16 or pos + alen > end:
            raise FormatError(f"MFT record {number} has a malformed attribute", where, "run chkdsk /f on the volume")
        if rec[pos + 8] and not (user and atype == _DATA):
            if alen < 34:
                raise FormatError(f"MFT record {number} has a truncated attribute", where)
            (mp_off,) = _NONRES_MP.unpack_from(rec, pos + 32)
            runs.extend(_mapping_pairs(rec, pos + mp_off, pos + alen))
        pos += alen
    return runs


def _geometry(head: bytes, where: str) -> tuple[int, int, int, int]:
    """(bytes per sector, cluster size, MFT record size, cluster count) from the boot sector."""
    if head[3:11] != b"NTFS    ":
        raise UnsupportedError("the volume is not NTFS", where)
    bps = int.from_bytes(head[0x0B:0x0D], "little")
    spc = head[0x0D]
    if spc > 0x80:
        spc = 1 << (256 - spc)
    cs = bps * spc
    v = head[0x40]
    rec = 1 << (256 - v) if v > 0x80 else v * cs
    sectors = int.from_bytes(head[0x28:0x30], "little")
    if not bps or not cs or rec < 512 or rec % _FIXUP_STRIDE:
        raise FormatError("the NTFS boot sector has a bad geometry", where)
    return bps, cs, rec, sectors * bps // cs


def metadata_extents(view: BlockDevice) -> list[tuple[int, int]]:
    """Byte extents (offset, length; sorted, merged) of ``view``'s NTFS metadata: every
    non-resident attribute run except the ``$DATA`` of ordinary files (records ≥ 24), the boot
    region, and the bytes past NTFS's cluster map. See the module docstring."""
    from dissect.ntfs import NTFS

    where = view.name
    _, cs, rsize, clusters = _geometry(view.read(0, 512), where)
    try:
        fs = NTFS(DeviceIO(view))
        mft_stream = fs.mft.get(0).open()
        mft_size = int(fs.mft.get(0).size())
    except Exception as e:
        raise FormatError(f"cannot read the NTFS $MFT: {e}", where, "run chkdsk /f on the volume") from None
    runs: list[tuple[int, int]] = [(0, 1)]  # the boot sectors ($Boot's run, also when unlisted)
    number = 0
    step = max(rsize, CHUNK // rsize * rsize)
    done = 0
    while done < mft_size:
        try:
            block = mft_stream.read(min(step, mft_size - done))
        except Exception as e:
            raise FormatError(f"cannot read the NTFS $MFT: {e}", where) from None
        if not block:
            break
        for p in range(0, len(block) - rsize + 1, rsize):
            if block[p : p + 4] == b"FILE" and block[p + 22] & _IN_USE:
                runs.extend(_record_runs(bytearray(block[p : p + rsize]), number, where))
            number += 1
        done += len(block)
    spans = sorted((lcn * cs, min(lcn + n, clusters) * cs) for lcn, n in runs if lcn < clusters)
    tail = clusters * cs
    if tail < view.size:
        spans.append((tail, view.size))
    return _merge(spans)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (start, end) spans → merged (offset, length) extents."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def _blocks_with_free(view: BlockDevice, blk: int) -> list[tuple[int, int]]:
    """(start, end) byte spans of the ``blk``-sized blocks that hold at least one free cluster."""
    import numpy as np

    from ..catalog.ntfs import ntfs_free_map

    fm = ntfs_free_map(view)
    k = blk // fm.cluster_size
    spans: list[tuple[int, int]] = []
    step = k * (1 << 20)  # clusters per slice: bounded memory
    for c0 in range(0, fm.cluster_count, step):
        n = min(step, fm.cluster_count - c0)
        used = fm.used_in(c0 * fm.cluster_size, n * fm.cluster_size)
        if used is None:
            break
        pad = -len(used) % k
        if pad:
            used = np.concatenate((used, np.ones(pad, dtype=bool)))
        has_free = ~used.reshape(-1, k).all(axis=1)
        idx = np.flatnonzero(has_free)
        if not idx.size:
            continue
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, cuts):
            a = c0 * fm.cluster_size + int(run[0]) * blk
            spans.append((a, a + (int(run[-1]) + 1) * blk - int(run[0]) * blk))
    return spans


def _file_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, hole - data))
        pos = hole
    return out


class MetadataOverlay:
    """A sparse temporary file holding a copy of ``view``'s NTFS metadata (see module docstring).

    Use as a context manager (the file is removed on exit). ``path`` is the overlay file for
    ntfscp; :meth:`merged` gives the combined view once it has been modified; ``bytes_read`` is
    what was read from the source for it and ``copied`` what was written into it.
    """

    def __init__(self, view: BlockDevice, folder: str | os.PathLike[str]) -> None:
        self.view = view
        try:
            fd, name = tempfile.mkstemp(prefix=".tt-overlay-", suffix=".raw", dir=folder)
        except OSError as e:
            raise ResourceError(
                f"cannot create the metadata overlay: {e.strerror}", str(folder), "is the output folder writable?"
            ) from e
        self.path = Path(name)
        self.copied = 0
        self.bytes_read = 0
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, view.size)
            blk = max(4096, os.fstat(fd).st_blksize)
            self.block = blk
            if _file_extents(fd, view.size):
                raise UnsupportedError(
                    "the temporary folder's filesystem does not report holes (SEEK_DATA)",
                    str(folder),
                    "write the output to an ext4/xfs/btrfs/tmpfs folder",
                )
            written: list[tuple[int, int]] = []
            extents = metadata_extents(view)
            cs = _geometry(view.read(0, 512), view.name)[1]
            if cs < blk:
                # clusters smaller than the file's blocks: a block ntfscp writes part of must not
                # be a hole elsewhere (the file system would zero-fill the rest), so every block
                # holding a free cluster (one ntfscp may allocate) is copied too
                extents = _merge([(o, o + n) for o, n in extents] + _blocks_with_free(view, blk))
            for o, n in extents:
                a = o // blk * blk
                b = min(view.size, -(-(o + n) // blk) * blk)
                written.extend(self._copy(fd, a, b))
            os.fsync(fd)
            # every data extent the file reports must be one we wrote: else holes are not exact
            ends = [(a, a + n) for a, n in _merge(written)]
            for o, n in _file_extents(fd, view.size):
                i = bisect.bisect_right(ends, (o, float("inf"))) - 1
                if i < 0 or ends[i][1] < o + n:
                    raise UnsupportedError(
                        "the temporary folder's filesystem reports holes inexactly",
                        str(folder),
                        "write the output to an ext4/xfs/btrfs/tmpfs folder",
                    )
        except OSError as e:
            os.close(fd)
            self._unlink()
            raise ResourceError(
                f"cannot write the metadata overlay: {e.strerror}",
                str(self.path),
                "is there free space in the output folder?",
            ) from e
        except BaseException:
            os.close(fd)
            self._unlink()
            raise
        os.close(fd)

    def _copy(self, fd: int, a: int, b: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = a
        while pos < b:
            # pieces end at 1 MiB boundaries: an all-zero chunk of the source stays a hole here,
            # as in a copy that skips zero chunks (the pass's sparse decision sees holes)
            k = min(CHUNK - pos % CHUNK, b - pos)
            data = self.view.read(pos, k)
            self.bytes_read += k
            if not is_zero(data):
                mv = memoryview(data)
                done = 0
                while done < k:
                    done += os.pwrite(fd, mv[done:], pos + done)
                self.copied += k
                out.append((pos, pos + k))
            pos += k
        return out

    def allocated_bytes(self) -> int:
        """Bytes the overlay file occupies on disk (st_blocks)."""
        return os.stat(self.path).st_blocks * 512

    def merged(self, *, sector_size: int = 512, free_map: Any = None) -> MergedVolume:
        """The volume as modified in the overlay: overlay extents, the source elsewhere.

        ``free_map`` (the *source's* NTFS free map): 1 MiB chunks free in it and all zeros in the
        source are reported unallocated by the view (read once here; see the module docstring).
        """
        return MergedVolume(self.view, self.path, sector_size=sector_size, free_map=free_map)

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        """Remove the overlay file."""
        self._unlink()

    def __enter__(self) -> MetadataOverlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MergedVolume(BlockDevice):
    """Read-only view: the overlay file's data extents over the source volume."""

    def __init__(
        self, source: BlockDevice, overlay: str | os.PathLike[str], *, sector_size: int = 512, free_map: Any = None
    ) -> None:
        self.source = source
        self.size = source.size
        self.sector_size = sector_size
        self.name = source.name
        self._ov = RawFile(overlay, sector_size=sector_size, size=source.size)
        try:
            ext = _file_extents(self._ov.fileno(), self.size)
        except OSError as e:
            self._ov.close()
            raise ResourceError(f"cannot map the overlay: {e.strerror}", str(overlay)) from e
        self.extents = ext
        self._starts = [o for o, _ in ext]
        self._ends = [o + n for o, n in ext]
        self.zero_chunks: set[int] = set()
        if free_map is not None:
            try:
                self.zero_chunks = self._free_zero_chunks(free_map)
            except BaseException:
                self._ov.close()
                raise

    def _free_zero_chunks(self, fm: Any) -> set[int]:
        """Chunks wholly free in ``fm``, not in the overlay and all zeros in the source."""
        cs = fm.cluster_size
        if CHUNK % cs:
            return set()
        n = self.size // CHUNK
        any_used = fm.any_used_per(CHUNK // cs, n)
        if any_used is None:
            return set()
        out: set[int] = set()
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        for o, k in self.source.allocated_ranges():
            for c in range(o // CHUNK, min(n, -(-(o + k) // CHUNK))):
                if any_used[c] or c in out or self.in_overlay(c * CHUNK, CHUNK):
                    continue
                self.source.read_into(c * CHUNK, mv)
                if is_zero(mv):
                    out.add(c)
        return out

    def in_overlay(self, offset: int, length: int) -> bool:
        """Whether the span overlaps one of the overlay's data extents."""
        i = bisect.bisect_right(self._starts, offset + length - 1) - 1
        return i >= 0 and self._ends[i] > offset

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, dst: memoryview) -> None:
        self._check_range(offset, len(dst))
        end = offset + len(dst)
        pos = offset
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        while pos < end:
            while i < len(self._ends) and self._ends[i] <= pos:
                i += 1
            if i < len(self._starts) and self._starts[i] <= pos:
                stop = min(end, self._ends[i])
                self._ov.read_into(pos, dst[pos - offset : stop - offset])
            else:
                stop = min(end, self._starts[i]) if i < len(self._starts) else end
                self.source.read_into(pos, dst[pos - offset : stop - offset])
            pos = stop

    def allocated_ranges(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        end = self.size if length is None else min(self.size, offset + length)
        spans: list[tuple[int, int]] = []
        zc = self.zero_chunks
        for o, n in self.source.allocated_ranges(offset, end - offset):
            a, e = o, o + n
            if zc:
                pos = a
                for c in range(a // CHUNK, -(-e // CHUNK)):
                    if c in zc:
                        if pos < c * CHUNK:
                            spans.append((pos, c * CHUNK))
                        pos = max(pos, (c + 1) * CHUNK)
                if pos < e:
                    spans.append((pos, e))
            else:
                spans.append((a, e))
        for o, n in self.extents:
            if o < end and o + n > offset:
                spans.append((max(o, offset), min(o + n, end)))
        yield from _merge(spans)

    def close(self) -> None:
        self._ov.close()
