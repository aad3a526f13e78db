"""VHDX log ([MS-VHDX] 2.3): find the active sequence and replay it into a copy of the file.

We never replay in place: ``replay_log(src, dst)`` copies ``src`` (sparsely) to a temporary file,
applies the active log sequence there, resets LogGuid in both headers and renames the result to
``dst``. The source stays untouched, so a failed replay loses nothing.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

from construct import Bytes, Int32ul, Int64ul, Struct

from ..atomic import atomic_output
from ..blockdev import RawFile
from ..errors import FormatError, ResourceError, UsageError
from . import build
from . import structs as S
from .layout import Reporter, crc_with_zeroed, parse_layout, pread_exact

ZeroDescriptor = Struct(
    "signature" / Bytes(4),
    "reserved" / Int32ul,
    "zero_length" / Int64ul,
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
DataDescriptor = Struct(
    "signature" / Bytes(4),
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
DataSector = Struct(
    "signature" / Bytes(4),
    "sequence_high" / Int32ul,
    "data" / Bytes(4084),
    "sequence_low" / Int32ul,
)
SIG_ZERO, SIG_DESC, SIG_DATA = b"zero", b"desc", b"data"


@dataclass
class LogEntry:
    offset: int  # relative to the log start
    header: Any
    raw: bytes


def _valid_entry(raw: bytes, h: Any, log_guid: uuid.UUID, log_length: int) -> bool:
    """Header, descriptor and data-sector consistency plus the whole-entry CRC."""
    el: int = h.entry_length
    if (
        h.signature != S.SIG_LOG_ENTRY
        or el == 0
        or el % S.LOG_SECTOR
        or el > log_length
        or len(raw) != el
        or h.sequence_number == 0
        or h.log_guid != log_guid
    ):
        return False
    nd: int = h.descriptor_count
    desc_sectors = -(-(nd + 2) // 128)
    if desc_sectors * S.LOG_SECTOR > el:
        return False
    if crc_with_zeroed(raw, S.LOG_ENTRY_CHECKSUM_OFFSET) != h.checksum:
        return False
    ndata = 0
    for i in range(nd):
        d = raw[64 + 32 * i : 96 + 32 * i]
        if d[:4] == SIG_DESC:
            ndata += 1
        elif d[:4] != SIG_ZERO:
            return False
        if int.from_bytes(d[24:32], "little") != h.sequence_number:
            return False
    return (desc_sectors + ndata) * S.LOG_SECTOR <= el


def _read_entries(fd: int, hdr: Any) -> dict[int, LogEntry]:
    out: dict[int, LogEntry] = {}
    log = pread_exact(fd, hdr.log_length, hdr.log_offset)  # the log region is small (1 MiB typical)
    n = len(log)
    for off in range(0, n - 63, S.LOG_SECTOR):
        if log[off : off + 4] != S.SIG_LOG_ENTRY:
            continue
        h = S.LogEntryHeader.parse(log[off : off + 64])
        el = h.entry_length
        if el == 0 or el % S.LOG_SECTOR or el > n:
            continue
        raw = log[off : off + el] if off + el <= n else log[off:] + log[: off + el - n]  # entries may wrap
        if _valid_entry(raw, h, hdr.log_guid, hdr.log_length):
            out[off] = LogEntry(off, h, raw)
    return out


def active_sequence(fd: int, hdr: Any) -> list[LogEntry]:
    """The entries of the active sequence, tail first (empty when there is none)."""
    if hdr.log_guid.int == 0 or hdr.log_length == 0:
        return []
    entries = _read_entries(fd, hdr)
    best: list[LogEntry] = []
    for head in entries.values():
        seq: list[LogEntry] = []
        off = head.header.tail
        ok = False
        for _ in range(len(entries) + 1):
            e = entries.get(off)
            if e is None or (seq and e.header.sequence_number != seq[-1].header.sequence_number + 1):
                break
            seq.append(e)
            if e is head:
                ok = True
                break
            off = (off + e.header.entry_length) % hdr.log_length
        if ok and (not best or head.header.sequence_number > best[-1].header.sequence_number):
            best = seq
    return best


def _apply(fd: int, seq: list[LogEntry], name: str) -> int:
    """Apply the sequence's descriptors to the file on ``fd``; returns the sectors written."""
    written = 0
    for e in seq:
        h = e.header
        desc_sectors = -(-(h.descriptor_count + 2) // 128)
        data_pos = desc_sectors * S.LOG_SECTOR
        for i in range(h.descriptor_count):
            d = e.raw[64 + 32 * i : 96 + 32 * i]
            if d[:4] == SIG_ZERO:
                z = ZeroDescriptor.parse(d)
                if z.file_offset % S.LOG_SECTOR or z.zero_length % S.LOG_SECTOR:
                    raise FormatError("log zero descriptor is not 4 KiB aligned", name)
                pos, left = z.file_offset, z.zero_length
                while left:
                    k = min(left, S.MiB)
                    os.pwrite(fd, bytes(k), pos)
                    pos += k
                    left -= k
                written += z.zero_length // S.LOG_SECTOR
            else:
                dd = DataDescriptor.parse(d)
                sec = DataSector.parse(e.raw[data_pos : data_pos + S.LOG_SECTOR])
                data_pos += S.LOG_SECTOR
                if (
                    sec.signature != SIG_DATA
                    or sec.sequence_high != h.sequence_number >> 32
                    or sec.sequence_low != h.sequence_number & 0xFFFFFFFF
                ):
                    raise FormatError("log data sector does not match its entry", name)
                if dd.file_offset % S.LOG_SECTOR:
                    raise FormatError("log data descriptor is not 4 KiB aligned", name)
                os.pwrite(fd, dd.leading_bytes + sec.data + dd.trailing_bytes, dd.file_offset)
                written += 1
    last = seq[-1].header.last_file_offset
    if os.fstat(fd).st_size < last:
        os.ftruncate(fd, last)
    return written


def replay_log(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy ``src`` to ``dst`` with its log replayed and LogGuid reset (``src`` is not modified)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise UsageError("replay writes a copy: choose another destination", str(dst))
    name = str(src)
    try:
        fd = os.open(src, os.O_RDONLY)
    except FileNotFoundError:
        from ..errors import NotFoundError

        raise NotFoundError("no such VHDX file", name) from None
    except OSError as e:
        raise ResourceError(f"cannot open: {e.strerror}", name) from e
    try:
        hdr, slot = _current_header(fd, name)
        seq = active_sequence(fd, hdr)
    finally:
        os.close(fd)
    with atomic_output(dst) as tmp:
        _sparse_copy(src, tmp)
        out = os.open(tmp, os.O_RDWR)
        try:
            n = _apply(out, seq, name) if seq else 0
            fwg = uuid.uuid4()
            for i, s in enumerate((1 - slot, slot)):
                raw = build.header(
                    hdr.sequence_number + 1 + i, fwg, hdr.data_write_guid, None, hdr.log_offset, hdr.log_length
                )
                os.pwrite(out, raw, S.HEADER_OFFSETS[s])
            os.fsync(out)
            parse_layout(out, Reporter(str(dst)))  # the result must now be a valid VHDX
        finally:
            os.close(out)
    return {
        "source": name,
        "destination": str(dst),
        "entries": len(seq),
        "sectors_written": n,
        "sequence": [e.header.sequence_number for e in seq],
    }


def _current_header(fd: int, name: str) -> tuple[Any, int]:
    best = None
    for i, off in enumerate(S.HEADER_OFFSETS):
        raw = pread_exact(fd, S.HEADER_SIZE, off)
        if len(raw) < S.HEADER_SIZE or raw[:4] != S.SIG_HEADER:
            continue
        h = S.Header.parse(raw)
        if crc_with_zeroed(raw, S.HEADER_CHECKSUM_OFFSET) != h.checksum or h.version != 1:
            continue
        if best is None or h.sequence_number > best[0].sequence_number:
            best = (h, i)
    if best is None:
        raise FormatError("no valid VHDX header", name)
    return best


def _sparse_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file keeping its holes (data ranges only)."""
    s = RawFile(src)
    try:
        with open(dst, "wb") as f:
            f.truncate(s.size)
            for off, n in s.allocated_ranges():
                pos = off
                while pos < off + n:
                    k = min(S.MiB * 4, off + n - pos)
                    f.seek(pos)
                    f.write(s.read(pos, k))
                    pos += k
    finally:
        s.close()
