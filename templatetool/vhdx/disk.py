"""VhdxDisk: a VHDX file (fixed, dynamic or differencing) as a streaming BlockDevice.

Reads go through the BAT with one ``preadv`` per contiguous file run; differencing disks read
absent sectors from their parent chain. Writes are offline and in place: new blocks are
appended at the end of the file, BAT entries are rewritten directly (no log), and the first
modification of a session rotates FileWriteGuid/DataWriteGuid in both headers.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..blockdev import BlockDevice, DirectWriter, advise_sequential, is_zero
from ..errors import (
    FormatError,
    IntegrityError,
    NotFoundError,
    ResourceError,
    UnsupportedError,
    UsageError,
)
from ..parallel import default_engine
from . import build
from . import structs as S
from .layout import (
    Finding,
    Layout,
    MetaItem,
    Region,
    Reporter,
    align_up,
    parse_layout,
    pread_exact,
)

PathLike = str | os.PathLike[str]

_PARENT_READ_STATES = (
    S.PAYLOAD_BLOCK_NOT_PRESENT,
    S.PAYLOAD_BLOCK_UNDEFINED,
    S.PAYLOAD_BLOCK_UNMAPPED,
    S.PAYLOAD_BLOCK_UNMAPPED_V095,
)


def _open_fd(path: PathLike, writable: bool) -> int:
    if os.path.isdir(path):
        raise UsageError("expected a VHDX file, got a folder", str(path))
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        raise NotFoundError("no such VHDX file", str(path)) from None
    except IsADirectoryError:
        raise UsageError("expected a VHDX file, got a folder", str(path)) from None
    except OSError as e:
        raise ResourceError(f"cannot open: {e.strerror}", str(path)) from e
    if not writable:
        advise_sequential(fd)
    return fd


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int, name: str) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        try:
            done += os.pwrite(fd, mv[done:], offset + done)
        except OSError as e:
            raise ResourceError(f"write failed: {e.strerror}", name) from e


def _preadv_into(fd: int, dst: memoryview, offset: int, name: str) -> None:
    """Fill ``dst`` from the file at ``offset``; bytes past end of file read as zeros."""
    done = 0
    n = len(dst)
    while done < n:
        try:
            k = os.preadv(fd, [dst[done:]], offset + done)
        except OSError as e:
            raise ResourceError(f"read failed: {e.strerror}", name) from e
        if k == 0:
            dst[done:] = bytes(n - done)
            return
        done += k


def parse_guid_text(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        return None


def parent_candidates(
    child: Path, locator: dict[str, str], parent_search: Sequence[PathLike] | None = None
) -> list[Path]:
    """Where to look for the parent: relative_path, volume_path, absolute_win32_path (spec order),
    each also read as a plain POSIX path, then the parent's file name in ``parent_search``."""
    out: list[Path] = []
    names: list[str] = []
    child_dir = child.absolute().parent
    rel = locator.get("relative_path")
    if rel:
        out.append(Path(os.path.normpath(child_dir / rel.replace("\\", "/"))))
        names.append(rel)
    for key in ("volume_path", "absolute_win32_path"):
        val = locator.get(key)
        if not val:
            continue
        names.append(val)
        s = val.removeprefix("\\\\?\\")
        if re.match(r"^[A-Za-z]:[\\/]", s) or s.lower().startswith(("volume{", "unc\\")):
            continue  # a Windows drive/volume/UNC path: not resolvable here except by name
        posix = s.replace("\\", "/")
        out.append(Path(posix if posix.startswith("/") else "/" + posix))
    basenames = []
    for n in names:
        b = re.split(r"[\\/]", n)[-1]
        if b and b not in basenames:
            basenames.append(b)
    for d in parent_search or ():
        dp = Path(d)
        if dp.is_dir():
            out.extend(dp / b for b in basenames)
        else:
            out.append(dp)
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


class VhdxDisk(BlockDevice):
    """An open VHDX file. Use :func:`open_vhdx` / :func:`create_vhdx` rather than the constructor."""

    def __init__(
        self,
        path: PathLike,
        writable: bool = False,
        parent_search: Sequence[PathLike] | None = None,
        _chain: tuple[str, ...] = (),
    ) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.writable = writable
        self._fd = _open_fd(path, writable)
        # large aligned payload writes bypass the page cache when the engine allows it
        self._direct = DirectWriter(self.path, enabled=writable and default_engine().direct_io)
        self.parent: VhdxDisk | None = None
        self._session_started = False
        try:
            self._rep = Reporter(self.name)
            try:
                lay = parse_layout(self._fd, self._rep)
            except OSError as e:
                raise ResourceError(f"read failed: {e.strerror}", self.name) from e
            self._load(lay)
            if self.layout.has_parent:
                self._open_parent(parent_search, _chain)
        except BaseException:
            self.close()
            raise

    # --- setup ----------------------------------------------------------------------------
    def _load(self, lay: Layout) -> None:
        self.layout = lay
        self.size = lay.size
        self.sector_size = lay.logical_sector_size
        self.logical_sector_size = lay.logical_sector_size
        self.physical_sector_size = lay.physical_sector_size
        self.block_size = lay.block_size
        self.virtual_disk_id = lay.disk_id
        self.subformat = lay.subformat
        self._bat = lay.bat
        self._cr = lay.chunk_ratio
        self._eof = align_up(lay.file_size, S.MiB)
        self.warnings: list[Finding] = list(self._rep.findings)

    def _open_parent(self, parent_search: Sequence[PathLike] | None, chain: tuple[str, ...]) -> None:
        loc = self.layout.locator or {}
        me = os.path.realpath(self.path)
        chain = (*chain, me)
        tried = parent_candidates(self.path, loc, parent_search)
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            shown = ", ".join(str(p) for p in tried) or "(no usable path in the locator)"
            raise NotFoundError(
                f"parent disk not found; tried {shown}",
                self.name,
                "the parent was moved or deleted: put it back or pass its folder (parent_search)",
                code="vhdx.parent-missing",
            )
        if os.path.realpath(found) in chain:
            raise FormatError(f"parent chain has a cycle: {found} is already in the chain", self.name)
        parent = VhdxDisk(found, writable=False, parent_search=parent_search, _chain=chain)
        try:
            want = [parse_guid_text(loc.get(k, "")) for k in ("parent_linkage", "parent_linkage2")]
            if want[0] is None:
                raise FormatError(f"parent_linkage {loc.get('parent_linkage')!r} is not a GUID", self.name)
            if parent.data_write_guid not in [w for w in want if w is not None]:
                raise IntegrityError(
                    f"parent {found} changed after this child was made: its DataWriteGuid is "
                    f"{{{parent.data_write_guid}}}, the child expects {{{want[0]}}}",
                    self.name,
                    "the chain is broken; use the parent this child was created from",
                )
            if parent.logical_sector_size != self.logical_sector_size:
                raise FormatError("parent and child logical sector sizes differ", self.name)
        except BaseException:
            parent.close()
            raise
        self.parent = parent

    # --- properties -----------------------------------------------------------------------
    @property
    def data_write_guid(self) -> uuid.UUID:
        """The current header's DataWriteGuid (children link to it)."""
        guid: uuid.UUID = self.layout.header.data_write_guid
        return guid

    @property
    def file_write_guid(self) -> uuid.UUID:
        guid: uuid.UUID = self.layout.header.file_write_guid
        return guid

    def parent_chain(self) -> list[Path]:
        """Paths of the parents, nearest first (empty for fixed/dynamic disks)."""
        out: list[Path] = []
        p = self.parent
        while p is not None:
            out.append(p.path)
            p = p.parent
        return out

    def _entry(self, block: int) -> int:
        return int(self._bat[block + block // self._cr])

    def allocated_bytes(self) -> int:
        """Virtual bytes backed by payload blocks stored in this file (not its parents)."""
        nb = self.layout.data_blocks
        blocks = np.arange(nb, dtype=np.int64)
        st = self._bat[blocks + blocks // self._cr] & np.uint64(7)
        present = np.flatnonzero((st == 6) | (st == 7))
        total = present.size * self.block_size
        if present.size and present[-1] == nb - 1:
            total -= nb * self.block_size - self.size
        return int(total)

    # --- reading --------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = bytearray(length)
        self._read_into(offset, memoryview(out))
        return bytes(out)

    def read_into(self, offset: int, dst: memoryview) -> None:
        self._check_range(offset, len(dst))
        self._read_into(offset, dst)

    def _read_into(self, offset: int, dst: memoryview) -> None:
        bs = self.block_size
        end = offset + len(dst)
        pos = offset
        run_f = run_b = run_n = 0  # pending contiguous file run: file offset, buffer offset, length
        while pos < end:
            blk = pos // bs
            boff = pos - blk * bs
            n = min(bs - boff, end - pos)
            e = self._entry(blk)
            st = e & 7
            b = pos - offset
            if st == S.PAYLOAD_BLOCK_FULLY_PRESENT:
                f = (e & S.BAT_OFFSET_MASK) + boff
                if run_n and run_f + run_n == f and run_b + run_n == b:
                    run_n += n
                else:
                    if run_n:
                        _preadv_into(self._fd, dst[run_b : run_b + run_n], run_f, self.name)
                    run_f, run_b, run_n = f, b, n
            else:
                if run_n:
                    _preadv_into(self._fd, dst[run_b : run_b + run_n], run_f, self.name)
                    run_n = 0
                if st == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self.parent is not None:
                    self._read_partial(blk, e, pos, dst[b : b + n])
                elif self.parent is not None and st in _PARENT_READ_STATES:
                    self._read_parent(pos, dst[b : b + n])
                elif st in (
                    S.PAYLOAD_BLOCK_NOT_PRESENT,
                    S.PAYLOAD_BLOCK_UNDEFINED,
                    S.PAYLOAD_BLOCK_ZERO,
                    S.PAYLOAD_BLOCK_UNMAPPED,
                    S.PAYLOAD_BLOCK_UNMAPPED_V095,
                ):
                    dst[b : b + n] = bytes(n)
                else:
                    raise FormatError(f"BAT entry for block {blk} has invalid state {st}", self.name)
            pos += n
        if run_n:
            _preadv_into(self._fd, dst[run_b : run_b + run_n], run_f, self.name)

    def _read_parent(self, pos: int, dst: memoryview) -> None:
        assert self.parent is not None
        n = len(dst)
        k = max(0, min(n, self.parent.size - pos))
        if k:
            self.parent._read_into(pos, dst[:k])
        if k < n:
            dst[k:] = bytes(n - k)

    def _sb_offset(self, blk: int) -> int:
        chunk = blk // self._cr
        e = int(self._bat[chunk * (self._cr + 1) + self._cr])
        if e & 7 != S.SB_BLOCK_PRESENT:
            raise FormatError(f"block {blk} is PARTIALLY_PRESENT but its sector bitmap is absent", self.name)
        return e & S.BAT_OFFSET_MASK

    def _bitmap_bits(self, blk: int, s0: int, s1: int) -> tuple[np.ndarray, int, int]:
        """Bits for absolute sectors [s0, s1) of block ``blk``; also (byte offset in file, first bit)."""
        lss = self.logical_sector_size
        cbase = (blk // self._cr) * (1 << 23)
        rel0, rel1 = s0 - cbase, s1 - cbase
        b0, b1 = rel0 // 8, (rel1 - 1) // 8 + 1
        foff = self._sb_offset(blk) + b0
        raw = pread_exact(self._fd, b1 - b0, foff).ljust(b1 - b0, b"\0")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        del lss
        return bits, foff, rel0 - b0 * 8

    def _read_partial(self, blk: int, entry: int, pos: int, dst: memoryview) -> None:
        lss = self.logical_sector_size
        n = len(dst)
        s0, s1 = pos // lss, -(-(pos + n) // lss)
        bits, _, first = self._bitmap_bits(blk, s0, s1)
        sel = bits[first : first + (s1 - s0)]
        base = entry & S.BAT_OFFSET_MASK
        blk_start = blk * self.block_size
        # runs of equal bits
        edges = np.flatnonzero(np.diff(sel.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [sel.size]))
        for a, z in zip(starts.tolist(), ends.tolist(), strict=True):
            lo = max(pos, (s0 + a) * lss)
            hi = min(pos + n, (s0 + z) * lss)
            if hi <= lo:
                continue
            piece = dst[lo - pos : hi - pos]
            if sel[a]:
                _preadv_into(self._fd, piece, base + (lo - blk_start), self.name)
            else:
                self._read_parent(lo, piece)

    def allocated_ranges(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """Ranges backed by data in this file (holes in the file skipped) or its parents."""
        end = self.size if length is None else min(self.size, offset + length)
        if end <= offset:
            return
        bs = self.block_size
        pend_o = pend_n = 0
        for o, n in self._raw_ranges(offset, end):
            if pend_n and pend_o + pend_n == o:
                pend_n += n
                continue
            if pend_n:
                yield pend_o, pend_n
            pend_o, pend_n = o, n
        if pend_n:
            yield pend_o, pend_n
        del bs

    def _raw_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        bs = self.block_size
        b0, b1 = offset // bs, -(-end // bs)
        blocks = np.arange(b0, b1, dtype=np.int64)
        entries = self._bat[blocks + blocks // self._cr]
        st = (entries & np.uint64(7)).astype(np.int64)
        cls = np.zeros(st.size, dtype=np.int8)  # 0 zero, 1 fully present, 2 partial, 3 parent
        cls[st == 6] = 1
        cls[st == 7] = 2
        if self.parent is not None:
            cls[np.isin(st, _PARENT_READ_STATES)] = 3
        edges = np.flatnonzero(np.diff(cls)) + 1
        starts = np.concatenate(([0], edges)).tolist()
        ends = np.concatenate((edges, [cls.size])).tolist()
        for a, z in zip(starts, ends, strict=True):
            c = int(cls[a])
            lo, hi = max(offset, (b0 + a) * bs), min(end, (b0 + z) * bs)
            if c == 0 or hi <= lo:
                continue
            if c == 2:
                yield lo, hi - lo
            elif c == 3:
                assert self.parent is not None
                phi = min(hi, self.parent.size)
                if phi > lo:
                    yield from self.parent.allocated_ranges(lo, phi - lo)
            else:
                for k in range(a, z):
                    blk = b0 + k
                    blo, bhi = max(lo, blk * bs), min(hi, (blk + 1) * bs)
                    foff = (int(entries[k]) & S.BAT_OFFSET_MASK) + (blo - blk * bs)
                    for fo, fn in self._file_data(foff, bhi - blo):
                        yield blo + (fo - foff), fn

    def _file_data(self, foff: int, n: int) -> Iterator[tuple[int, int]]:
        """Data (non-hole) sub-ranges of file range [foff, foff+n)."""
        end = foff + n
        pos = foff
        while pos < end:
            try:
                d = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                yield pos, end - pos  # SEEK_DATA unsupported: assume data
                return
            if d >= end:
                return
            try:
                h = min(os.lseek(self._fd, d, os.SEEK_HOLE), end)
            except OSError:
                h = end
            yield d, h - d
            pos = h

    # --- writing --------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise UnsupportedError("the VHDX is open read-only", self.name)

    def _write_headers(self, new_dwg: bool) -> None:
        lay = self.layout
        h = lay.header
        fwg = uuid.uuid4()
        dwg = uuid.uuid4() if new_dwg else h.data_write_guid
        seq = max(
            x.sequence_number for x, ok in zip(lay.headers, lay.header_valid, strict=True) if ok and x is not None
        )
        other = 1 - lay.current
        for i, slot in enumerate((other, lay.current)):
            raw = build.header(seq + 1 + i, fwg, dwg, None, h.log_offset, h.log_length)
            _pwrite_all(self._fd, raw, S.HEADER_OFFSETS[slot], self.name)
            os.fsync(self._fd)
            lay.headers[slot] = S.Header.parse(raw)
            lay.header_valid[slot] = True

    def _begin_modify(self) -> None:
        self._require_writable()
        if not self._session_started:
            self._write_headers(new_dwg=True)
            self._session_started = True

    def _set_bat(self, idx: int, value: int) -> None:
        self._bat[idx] = value
        _pwrite_all(self._fd, int(value).to_bytes(8, "little"), self.layout.bat_region.offset + idx * 8, self.name)

    def _allocate(self, length: int) -> int:
        off = self._eof
        self._eof += align_up(length, S.MiB)
        try:
            os.ftruncate(self._fd, self._eof)
        except OSError as e:
            raise ResourceError(f"cannot grow the file: {e.strerror}", self.name) from e
        return off

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if not len(mv):
            return
        self._begin_modify()
        bs = self.block_size
        pos, end = offset, offset + len(mv)
        while pos < end:
            blk = pos // bs
            boff = pos - blk * bs
            n = min(bs - boff, end - pos)
            self._write_block(blk, boff, mv[pos - offset : pos - offset + n])
            pos += n

    def _block_len(self, blk: int) -> int:
        return min(self.block_size, self.size - blk * self.block_size)

    def set_direct_io(self, on: bool) -> None:
        """Use ``O_DIRECT`` for large aligned payload writes (where the filesystem allows it), or
        not; the initial setting is the default engine's ``direct_io``."""
        self._direct.close()
        self._direct = DirectWriter(self.path, enabled=on and self.writable)

    @property
    def direct_io(self) -> bool:
        """True while large aligned payload writes go through ``O_DIRECT``."""
        return self._direct.enabled

    def _payload_write(self, chunk: memoryview, foff: int) -> None:
        """Write payload bytes; large 4 KiB-aligned writes from page-aligned buffers (the disk
        passes' shared chunk slots) bypass the page cache with ``O_DIRECT`` (see
        :class:`~templatetool.blockdev.DirectWriter`), an unaligned tail and everything else go
        through ``pwrite``; buffered throughout where ``O_DIRECT`` is refused (tmpfs) or the
        engine's ``direct_io`` is off.
        """
        head = self._direct.aligned_len(chunk, foff)
        if head and self._direct.write(chunk[:head], foff, self.name):
            chunk, foff = chunk[head:], foff + head
            if not len(chunk):
                return
        _pwrite_all(self._fd, chunk, foff, self.name)

    def _write_block(self, blk: int, boff: int, chunk: memoryview) -> None:
        idx = blk + blk // self._cr
        e = int(self._bat[idx])
        st = e & 7
        if st == S.PAYLOAD_BLOCK_FULLY_PRESENT:
            self._payload_write(chunk, (e & S.BAT_OFFSET_MASK) + boff)
            return
        if st == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
            self._write_partial(blk, e & S.BAT_OFFSET_MASK, boff, chunk)
            return
        full = boff == 0 and len(chunk) == self._block_len(blk)
        if self.parent is not None and st in _PARENT_READ_STATES and not full:
            off = self._allocate(self.block_size)
            self._ensure_bitmap(blk)
            self._set_bat(idx, off | S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
            self._write_partial(blk, off, boff, chunk)
            return
        if self.parent is None and is_zero(chunk):
            return  # the block already reads as zeros: stay sparse
        off = self._allocate(self.block_size)
        self._payload_write(chunk, off + boff)
        self._set_bat(idx, off | S.PAYLOAD_BLOCK_FULLY_PRESENT)

    def _ensure_bitmap(self, blk: int) -> None:
        chunk = blk // self._cr
        sidx = chunk * (self._cr + 1) + self._cr
        if int(self._bat[sidx]) & 7 != S.SB_BLOCK_PRESENT:
            off = self._allocate(S.SECTOR_BITMAP_BLOCK)
            self._set_bat(sidx, off | S.SB_BLOCK_PRESENT)

    def _write_partial(self, blk: int, base: int, boff: int, chunk: memoryview) -> None:
        """Write into a PARTIALLY_PRESENT block: whole sectors, then set their bitmap bits."""
        lss = self.logical_sector_size
        blk_start = blk * self.block_size
        pos = blk_start + boff
        end = pos + len(chunk)
        s0, s1 = pos // lss, -(-end // lss)
        lo, hi = s0 * lss, s1 * lss
        if lo == pos and hi == end:
            buf: bytes | memoryview = chunk
        else:
            head = self.read(lo, pos - lo) if pos > lo else b""
            tail = self.read(end, hi - end) if hi > end else b""
            buf = head + bytes(chunk) + tail
        _pwrite_all(self._fd, buf, base + (lo - blk_start), self.name)
        bits, foff, first = self._bitmap_bits(blk, s0, s1)
        bits[first : first + (s1 - s0)] = 1
        _pwrite_all(self._fd, np.packbits(bits, bitorder="little").tobytes(), foff, self.name)
        # a block whose sectors are all present becomes FULLY_PRESENT
        bl = self._block_len(blk)
        bbits, _, bfirst = self._bitmap_bits(blk, blk_start // lss, (blk_start + bl) // lss)
        if bbits[bfirst : bfirst + bl // lss].all():
            self._set_bat(blk + blk // self._cr, base | S.PAYLOAD_BLOCK_FULLY_PRESENT)

    # --- user metadata --------------------------------------------------------------------
    def user_metadata(self) -> list[tuple[uuid.UUID, int, bool]]:
        """(item GUID, size, is_virtual_disk) for every user metadata item."""
        return [(it.item_id, len(it.data), it.is_virtual_disk) for it in self.layout.items if it.is_user]

    def get_user_metadata(self, item_id: uuid.UUID | str) -> bytes:
        """The payload of user metadata item ``item_id``."""
        gid = _as_uuid(item_id)
        for it in self.layout.items:
            if it.is_user and it.item_id == gid:
                return it.data
        raise NotFoundError(f"no user metadata item {gid}", self.name)

    def set_user_metadata(self, item_id: uuid.UUID | str, data: bytes, virtual_disk: bool = True) -> None:
        """Add or replace a user metadata item (IsUser=1, IsRequired=0); rotates DataWriteGuid."""
        self._require_writable()
        gid = _as_uuid(item_id)
        data = bytes(data)
        if not data:
            raise UsageError("a metadata item cannot be empty (libvhdi rejects zero-length items)", str(gid))
        if len(data) > S.MAX_ITEM_SIZE:
            raise UsageError(
                f"metadata item of {len(data)} bytes exceeds the 1 MiB limit", str(gid), "split it into several items"
            )
        items = [it for it in self.layout.items if not (it.is_user and it.item_id == gid)]
        if sum(it.is_user for it in items) >= S.MAX_USER_ITEMS:
            raise UsageError("the disk already holds 1024 user metadata items", self.name)
        flags = S.MD_IS_USER | (S.MD_IS_VIRTUAL_DISK if virtual_disk else 0)
        items.append(MetaItem(gid, flags, data))
        self._store_metadata(items)

    def remove_user_metadata(self, item_id: uuid.UUID | str) -> None:
        """Delete a user metadata item; rotates DataWriteGuid."""
        self._require_writable()
        gid = _as_uuid(item_id)
        items = [it for it in self.layout.items if not (it.is_user and it.item_id == gid)]
        if len(items) == len(self.layout.items):
            raise NotFoundError(f"no user metadata item {gid}", self.name)
        self._store_metadata(items)

    def _store_metadata(self, items: list[MetaItem]) -> None:
        self._write_headers(new_dwg=True)  # a user-visible change: new DataWriteGuid first
        self._session_started = True
        md = self.layout.metadata_region
        region = build.metadata_region(items, md.length)
        if len(region) > md.length:
            # grow: move the metadata region to the end of the file and rewrite both region tables
            off = self._allocate(len(region))
            _pwrite_all(self._fd, region, off, self.name)
            new = Region(md.guid, off, len(region), md.required | 1)
            regions = [new if r.guid == S.METADATA_REGION else r for r in self.layout.regions]
            table = build.region_table(regions)
            os.fsync(self._fd)
            for toff in S.REGION_TABLE_OFFSETS:
                _pwrite_all(self._fd, table, toff, self.name)
            self.layout.regions = regions
            self.layout.metadata_region = new
        else:
            _pwrite_all(self._fd, region, md.offset, self.name)
        self.layout.items = items

    # --- lifecycle ------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writable and getattr(self, "_fd", -1) >= 0:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise ResourceError(f"fsync failed: {e.strerror}", self.name) from e

    def close(self) -> None:
        if hasattr(self, "_direct"):
            self._direct.close()
        if getattr(self, "_fd", -1) >= 0:
            try:
                if self.writable and self._session_started:
                    self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1
        if self.parent is not None:
            self.parent.close()
            self.parent = None

    def __enter__(self) -> VhdxDisk:
        return self

    def __repr__(self) -> str:
        return f"VhdxDisk({self.name!r}, {self.subformat}, size={self.size})"


def _as_uuid(v: uuid.UUID | str) -> uuid.UUID:
    if isinstance(v, uuid.UUID):
        return v
    g = parse_guid_text(str(v))
    if g is None:
        raise UsageError(f"not a GUID: {v!r}")
    return g


def open_vhdx(path: PathLike, writable: bool = False, parent_search: Sequence[PathLike] | None = None) -> VhdxDisk:
    """Open a VHDX (fixed, dynamic or differencing, following its parent chain) as a BlockDevice.

    Raises FormatError/IntegrityError for corrupt files, UnsupportedError for a log that needs a
    replay, NotFoundError for a missing parent (naming every path tried).
    """
    return VhdxDisk(path, writable=writable, parent_search=parent_search)
