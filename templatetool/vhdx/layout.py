"""Parse and validate the VHDX metadata structures (everything but payload data).

One code path serves two callers: :func:`parse_layout` with a strict :class:`Reporter` raises the
first fatal problem as a typed error (used by ``open_vhdx``), and with a collecting reporter it
records :class:`Finding` objects and keeps going where it can (used by ``check``).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NoReturn

import crc32c
import numpy as np

from ..errors import FormatError, IntegrityError, TemplateToolError, UnsupportedError
from . import structs as S

# ---------------------------------------------------------------------------------------------
# findings and reporting


@dataclass
class Finding:
    """One result of a structural check."""

    severity: str  # "error" | "warning"
    kind: str  # error kind: format, integrity, unsupported, not-found, ...
    message: str
    where: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        s = f"{self.severity}: {self.message}"
        if self.where:
            s += f" ({self.where})"
        if self.hint:
            s += f"; {self.hint}"
        return s

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "kind": self.kind,
            "message": self.message,
            "where": self.where,
            "hint": self.hint,
        }

    @classmethod
    def from_error(cls, e: TemplateToolError) -> Finding:
        return cls("error", e.kind, e.what, e.where, e.hint)


class Stop(Exception):
    """Internal: a collecting reporter hit a problem that prevents further parsing."""


class Reporter:
    """Routes problems either to exceptions (strict open) or to findings (check)."""

    def __init__(self, name: str, collect: bool = False) -> None:
        self.name = name
        self.collect = collect
        self.findings: list[Finding] = []

    def _where(self, where: str | None) -> str:
        return f"{self.name}: {where}" if where else self.name

    def fail(
        self, cls: type[TemplateToolError], what: str, where: str | None = None, hint: str | None = None
    ) -> NoReturn:
        """A problem that stops parsing in both modes."""
        if not self.collect:
            raise cls(what, self._where(where), hint)
        self.findings.append(Finding("error", cls.kind, what, where, hint))
        raise Stop

    def error(self, cls: type[TemplateToolError], what: str, where: str | None = None, hint: str | None = None) -> None:
        """Refuses the open; in check mode it is recorded and parsing continues."""
        if not self.collect:
            raise cls(what, self._where(where), hint)
        self.findings.append(Finding("error", cls.kind, what, where, hint))

    def flaw(self, what: str, where: str | None = None, hint: str | None = None) -> None:
        """A spec violation we can read past: an error for ``check``, a warning for open."""
        sev = "error" if self.collect else "warning"
        self.findings.append(Finding(sev, "format", what, where, hint))

    def warn(self, what: str, where: str | None = None, hint: str | None = None) -> None:
        self.findings.append(Finding("warning", "format", what, where, hint))

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)


# ---------------------------------------------------------------------------------------------
# small helpers


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read up to ``length`` bytes at ``offset`` (shorter only at end of file)."""
    out = bytearray()
    while len(out) < length:
        b = os.pread(fd, length - len(out), offset + len(out))
        if not b:
            break
        out += b
    return bytes(out)


def crc_with_zeroed(buf: bytes, checksum_offset: int) -> int:
    """CRC-32C of ``buf`` with the 4-byte checksum field at ``checksum_offset`` counted as zero."""
    c = crc32c.crc32c(buf[:checksum_offset])
    c = crc32c.crc32c(b"\0\0\0\0", c)
    return crc32c.crc32c(buf[checksum_offset + 4 :], c)


def with_crc(buf: bytes | bytearray, checksum_offset: int) -> bytes:
    """Return ``buf`` with its CRC-32C stored at ``checksum_offset``."""
    b = bytearray(buf)
    b[checksum_offset : checksum_offset + 4] = b"\0\0\0\0"
    b[checksum_offset : checksum_offset + 4] = crc32c.crc32c(bytes(b)).to_bytes(4, "little")
    return bytes(b)


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ---------------------------------------------------------------------------------------------
# parsed pieces


@dataclass
class MetaItem:
    """A metadata item with its payload (items are small: at most 1 MiB each)."""

    item_id: uuid.UUID
    flags: int
    data: bytes

    @property
    def is_user(self) -> bool:
        return bool(self.flags & S.MD_IS_USER)

    @property
    def is_virtual_disk(self) -> bool:
        return bool(self.flags & S.MD_IS_VIRTUAL_DISK)

    @property
    def is_required(self) -> bool:
        return bool(self.flags & S.MD_IS_REQUIRED)


@dataclass
class Region:
    guid: uuid.UUID
    offset: int
    length: int
    required: int


@dataclass
class Layout:
    """Everything parsed from a VHDX file except payload data."""

    file_size: int
    creator: str
    headers: list[Any | None]  # parsed construct containers (None when unreadable)
    header_valid: list[bool]
    current: int  # index of the current header
    regions: list[Region]
    bat_region: Region
    metadata_region: Region
    items: list[MetaItem]
    block_size: int
    has_parent: bool
    leave_allocated: bool
    size: int
    disk_id: uuid.UUID
    logical_sector_size: int
    physical_sector_size: int
    locator: dict[str, str] | None
    chunk_ratio: int
    data_blocks: int
    sb_blocks: int
    total_bat_entries: int
    bat: np.ndarray = field(repr=False)

    @property
    def header(self) -> Any:
        return self.headers[self.current]

    @property
    def subformat(self) -> str:
        if self.has_parent:
            return "differencing"
        return "fixed" if self.leave_allocated else "dynamic"


def bat_geometry(size: int, block_size: int, lss: int, has_parent: bool) -> tuple[int, int, int, int]:
    """(chunk_ratio, data_blocks, sb_blocks, total_bat_entries) per [MS-VHDX] 2.5."""
    chunk_ratio = ((1 << 23) * lss) // block_size
    data_blocks = -(-size // block_size)
    sb_blocks = -(-data_blocks // chunk_ratio)
    total = sb_blocks * (chunk_ratio + 1) if has_parent else data_blocks + (data_blocks - 1) // chunk_ratio
    return chunk_ratio, data_blocks, sb_blocks, total


# ---------------------------------------------------------------------------------------------
# parsing


def _parse_header(raw: bytes) -> tuple[Any | None, str | None, type[TemplateToolError]]:
    """(container, problem, error class) for one 4 KiB header slot."""
    if len(raw) < S.HEADER_SIZE:
        return None, "header slot is truncated", FormatError
    h = S.Header.parse(raw)
    if h.signature != S.SIG_HEADER:
        return h, f"bad signature {h.signature!r} (expected b'head')", FormatError
    calc = crc_with_zeroed(raw, S.HEADER_CHECKSUM_OFFSET)
    if calc != h.checksum:
        return h, f"CRC-32C mismatch (stored {h.checksum:#010x}, computed {calc:#010x})", IntegrityError
    if h.version != 1:
        return h, f"unsupported format version {h.version} (only version 1 exists)", UnsupportedError
    return h, None, FormatError


def _scan_log(fd: int, h: Any, file_size: int) -> int:
    """Count valid log entries belonging to ``h.log_guid`` (a non-empty log must be replayed)."""
    found = 0
    start, length = h.log_offset, h.log_length
    end = min(start + length, file_size)
    pos = start
    while pos < end:
        piece = pread_exact(fd, min(S.MiB, end - pos), pos)
        for k in range(0, len(piece) - 63, S.LOG_SECTOR):
            if piece[k : k + 4] != S.SIG_LOG_ENTRY:
                continue
            e = S.LogEntryHeader.parse(piece[k : k + 64])
            el = e.entry_length
            if el == 0 or el % S.LOG_SECTOR or el > length or e.sequence_number == 0 or e.log_guid != h.log_guid:
                continue
            entry = pread_exact(fd, el, pos + k)
            if len(entry) == el and crc_with_zeroed(entry, S.LOG_ENTRY_CHECKSUM_OFFSET) == e.checksum:
                found += 1
        pos += len(piece) if piece else end - pos
    return found


def _parse_region_table(raw: bytes) -> tuple[list[Region] | None, str | None, type[TemplateToolError]]:
    if len(raw) < S.REGION_TABLE_SIZE:
        return None, "region table is truncated", FormatError
    rh = S.RegionTableHeader.parse(raw)
    if rh.signature != S.SIG_REGION:
        return None, f"bad signature {rh.signature!r} (expected b'regi')", FormatError
    calc = crc_with_zeroed(raw, S.REGION_CHECKSUM_OFFSET)
    if calc != rh.checksum:
        return None, f"CRC-32C mismatch (stored {rh.checksum:#010x}, computed {calc:#010x})", IntegrityError
    if rh.entry_count > S.MAX_TABLE_ENTRIES:
        return None, f"entry count {rh.entry_count} exceeds 2047", FormatError
    out = []
    for i in range(rh.entry_count):
        e = S.RegionTableEntry.parse(raw[16 + 32 * i : 48 + 32 * i])
        out.append(Region(e.guid, e.file_offset, e.length, e.required))
    return out, None, FormatError


def parse_locator(data: bytes, rep: Reporter) -> dict[str, str]:
    """Decode a VHDX parent locator item into its key/value pairs."""
    where = "metadata item ParentLocator"
    if len(data) < 20:
        rep.fail(FormatError, "parent locator is shorter than its 20-byte header", where)
    ph = S.ParentLocatorHeader.parse(data[:20])
    if ph.locator_type != S.VHDX_PARENT_LOCATOR_TYPE:
        rep.fail(UnsupportedError, f"unknown parent locator type {ph.locator_type}", where)
    n = ph.key_value_count
    if 20 + 12 * n > len(data):
        rep.fail(FormatError, f"parent locator claims {n} entries but holds only {len(data)} bytes", where)
    out: dict[str, str] = {}
    for i in range(n):
        e = S.ParentLocatorEntry.parse(data[20 + 12 * i : 32 + 12 * i])
        spans = ((e.key_offset, e.key_length), (e.value_offset, e.value_length))
        for off, ln in spans:
            if off == 0 or ln == 0 or ln % 2 or off + ln > len(data):
                rep.fail(FormatError, f"parent locator entry {i} has an invalid offset/length", where)
        try:
            key = data[e.key_offset : e.key_offset + e.key_length].decode("utf-16-le")
            val = data[e.value_offset : e.value_offset + e.value_length].decode("utf-16-le")
        except UnicodeDecodeError:
            rep.fail(FormatError, f"parent locator entry {i} is not valid UTF-16LE", where)
        if key in out:
            rep.fail(FormatError, f"parent locator key {key!r} appears twice", where)
        out[key] = val
    if "parent_linkage" not in out:
        rep.fail(FormatError, "parent locator has no parent_linkage", where)
    if not any(k in out for k in ("relative_path", "volume_path", "absolute_win32_path")):
        rep.fail(FormatError, "parent locator names no parent path", where)
    return out


def parse_layout(fd: int, rep: Reporter) -> Layout:
    """Parse and validate every metadata structure of the VHDX open on ``fd``."""
    file_size = os.fstat(fd).st_size
    ident = pread_exact(fd, 520, 0)
    if len(ident) < 8 or ident[:8] != S.SIG_FILE:
        rep.fail(FormatError, "not a VHDX file (no 'vhdxfile' signature at offset 0)", "offset 0")
    creator = ident[8:520].decode("utf-16-le", "replace").split("\0")[0] if len(ident) >= 520 else ""
    if file_size < S.REGION_TABLE_OFFSETS[1] + S.REGION_TABLE_SIZE:
        rep.fail(
            FormatError,
            f"file is truncated: {file_size} bytes, shorter than the 320 KiB header section",
            hint="the copy is incomplete",
        )

    # --- headers
    headers: list[Any | None] = []
    valid: list[bool] = []
    problems: list[tuple[str, type[TemplateToolError]]] = []
    raws = []
    for i, off in enumerate(S.HEADER_OFFSETS):
        raw = pread_exact(fd, S.HEADER_SIZE, off)
        raws.append(raw)
        h, problem, cls = _parse_header(raw)
        headers.append(h)
        valid.append(problem is None)
        if problem:
            problems.append((f"header {i + 1}: {problem}", cls))
    if not any(valid):
        cls = (
            UnsupportedError
            if any(c is UnsupportedError for _, c in problems)
            else (IntegrityError if any(c is IntegrityError for _, c in problems) else FormatError)
        )
        rep.fail(cls, "no valid VHDX header: " + "; ".join(p for p, _ in problems), "headers at 64 KiB and 128 KiB")
    for p, _ in problems:
        rep.flaw(p, "headers", "the other header is used")
    if all(valid):
        h0, h1 = headers
        assert h0 is not None and h1 is not None  # a valid slot always parsed
        s0, s1 = h0.sequence_number, h1.sequence_number
        if s0 == s1 and raws[0] != raws[1]:
            rep.fail(FormatError, f"both headers carry sequence number {s0} but differ", "headers")
        current = 0 if s0 >= s1 else 1
    else:
        current = 0 if valid[0] else 1
    h = headers[current]
    assert h is not None

    # --- log
    if h.log_version != 0:
        rep.error(UnsupportedError, f"unsupported log version {h.log_version}", "header")
    log_ok = True
    if h.log_length:
        if h.log_offset < S.MiB or h.log_offset % S.MiB or h.log_length % S.MiB:
            rep.error(FormatError, f"log at {h.log_offset}+{h.log_length} is not 1 MiB aligned", "header")
            log_ok = False
        elif h.log_offset + h.log_length > file_size:
            rep.error(
                FormatError,
                f"log region {h.log_offset}+{h.log_length} lies past the end of the file ({file_size} bytes)",
                "header",
                "the file is truncated",
            )
            log_ok = False
    if h.log_guid.int != 0:
        n = _scan_log(fd, h, file_size) if (log_ok and h.log_length) else 0
        if n:
            rep.fail(
                UnsupportedError,
                f"the log holds {n} unreplayed entr{'y' if n == 1 else 'ies'}: the file was not closed cleanly",
                "log",
                "replay it into a copy first: templatetool vhdx replay-log FILE COPY.vhdx",
            )
        rep.warn("LogGuid is set but the log holds no valid entry (nothing to replay)", "header")

    # --- region tables
    tables: list[list[Region] | None] = []
    traws = []
    for i, off in enumerate(S.REGION_TABLE_OFFSETS):
        raw = pread_exact(fd, S.REGION_TABLE_SIZE, off)
        traws.append(raw)
        t, problem, cls = _parse_region_table(raw)
        tables.append(t)
        if problem:
            rep.error(
                cls,
                f"region table {i + 1}: {problem}",
                f"offset {off}",
                "libvhdi refuses files with any bad region table",
            )
    if tables[0] is None and tables[1] is None:
        rep.fail(FormatError, "no usable region table", "region tables")
    if tables[0] is not None and tables[1] is not None and traws[0] != traws[1]:
        rep.error(FormatError, "the two region tables differ", "region tables")
    regions = next(t for t in tables if t is not None)  # rep.fail above when both are unusable
    spans: list[tuple[int, int, str]] = [(0, S.MiB, "header section")]
    if h.log_length:
        spans.append((h.log_offset, h.log_offset + h.log_length, "log"))
    seen: dict[uuid.UUID, Region] = {}
    for r in regions:
        name = {S.BAT_REGION: "BAT", S.METADATA_REGION: "metadata"}.get(r.guid, str(r.guid))
        where = f"region {name}"
        if r.guid in seen:
            rep.fail(FormatError, f"region {name} appears twice", "region table")
        seen[r.guid] = r
        if r.guid not in (S.BAT_REGION, S.METADATA_REGION):
            if r.required & 1:
                rep.fail(
                    UnsupportedError,
                    f"unknown required region {r.guid}",
                    where,
                    "a newer writer made this file; it cannot be read safely",
                )
            continue
        if r.offset % S.MiB or r.offset < S.MiB or r.length % S.MiB or r.length == 0:
            rep.fail(FormatError, f"region {name} at {r.offset}+{r.length} is not 1 MiB aligned", where)
        if r.offset + r.length > file_size:
            rep.fail(
                FormatError,
                f"region {name} ({r.offset}+{r.length}) lies past the end of the file ({file_size} bytes)",
                where,
                "the file is truncated",
            )
        if not r.required & 1:
            rep.warn(f"region {name} does not carry Required=1", where)
        if r.required & ~1:
            rep.flaw(f"region {name} has reserved Required bits set ({r.required:#x})", where)
        spans.append((r.offset, r.offset + r.length, f"region {name}"))
    spans.sort()
    for a, b in pairwise(spans):
        if b[0] < a[1]:
            rep.fail(FormatError, f"{a[2]} ({a[0]}..{a[1]}) overlaps {b[2]} ({b[0]}..{b[1]})", "region table")
    if S.BAT_REGION not in seen or S.METADATA_REGION not in seen:
        rep.fail(FormatError, "the region table lacks the BAT or metadata region", "region table")
    bat_r, md_r = seen[S.BAT_REGION], seen[S.METADATA_REGION]

    # --- metadata
    items = _parse_metadata(fd, md_r, rep)
    sysitems = {it.item_id: it for it in items if not it.is_user}
    for gid, ln in S.SYSTEM_ITEM_LENGTHS.items():
        nm = S.SYSTEM_ITEM_NAMES[gid]
        if gid not in sysitems:
            rep.fail(FormatError, f"required metadata item {nm} is missing", "metadata table")
        if len(sysitems[gid].data) != ln:
            rep.fail(
                FormatError, f"metadata item {nm} has length {len(sysitems[gid].data)}, expected {ln}", "metadata table"
            )
    fp = S.FileParameters.parse(sysitems[S.FILE_PARAMETERS].data)
    bs = fp.block_size
    if not is_pow2(bs) or bs < S.MiB or bs > 256 * S.MiB:
        rep.fail(
            FormatError,
            f"invalid block size {bs} (must be a power of 2 from 1 MiB to 256 MiB)",
            "metadata item FileParameters",
        )
    if fp.flags & ~3:
        rep.flaw(f"FileParameters has reserved flag bits set ({fp.flags:#x})", "metadata item FileParameters")
    if fp.flags & 3 == 3:
        rep.fail(
            FormatError,
            "FileParameters flags = 3 (LeaveBlockAllocated with HasParent) is invalid",
            "metadata item FileParameters",
        )
    has_parent = bool(fp.flags & S.FP_HAS_PARENT)
    lss = int.from_bytes(sysitems[S.LOGICAL_SECTOR_SIZE].data, "little")
    pss = int.from_bytes(sysitems[S.PHYSICAL_SECTOR_SIZE].data, "little")
    if lss not in (512, 4096):
        rep.fail(FormatError, f"invalid logical sector size {lss}", "metadata item LogicalSectorSize")
    if pss not in (512, 4096):
        rep.fail(FormatError, f"invalid physical sector size {pss}", "metadata item PhysicalSectorSize")
    size = int.from_bytes(sysitems[S.VIRTUAL_DISK_SIZE].data, "little")
    if size == 0 or size % lss or size > S.MAX_DISK_SIZE:
        rep.fail(
            FormatError,
            f"invalid virtual disk size {size} (must be a non-zero multiple of {lss}, at most 64 TiB)",
            "metadata item VirtualDiskSize",
        )
    disk_id = uuid.UUID(bytes_le=sysitems[S.VIRTUAL_DISK_ID].data)
    locator = None
    if has_parent:
        if S.PARENT_LOCATOR not in sysitems:
            rep.fail(FormatError, "differencing disk without a parent locator", "metadata table")
        locator = parse_locator(sysitems[S.PARENT_LOCATOR].data, rep)
    elif S.PARENT_LOCATOR in sysitems:
        rep.warn("parent locator present on a disk without HasParent (ignored)", "metadata table")

    # --- BAT
    cr, nblocks, nsb, total = bat_geometry(size, bs, lss, has_parent)
    if bat_r.length < total * 8:
        rep.fail(FormatError, f"BAT region ({bat_r.length} bytes) is too small for {total} entries", "region BAT")
    bat = np.empty(total, dtype="<u8")
    mv = memoryview(bat.data).cast("B")
    got = 0
    while got < len(mv):
        k = os.preadv(fd, [mv[got:]], bat_r.offset + got)
        if k == 0:
            rep.fail(FormatError, "BAT is truncated", "region BAT", "the file is truncated")
        got += k
    _check_bat(bat, cr, nblocks, size, bs, has_parent, file_size, spans, rep)

    return Layout(
        file_size=file_size,
        creator=creator,
        headers=headers,
        header_valid=valid,
        current=current,
        regions=regions,
        bat_region=bat_r,
        metadata_region=md_r,
        items=items,
        block_size=bs,
        has_parent=has_parent,
        leave_allocated=bool(fp.flags & S.FP_LEAVE_BLOCK_ALLOCATED),
        size=size,
        disk_id=disk_id,
        logical_sector_size=lss,
        physical_sector_size=pss,
        locator=locator,
        chunk_ratio=cr,
        data_blocks=nblocks,
        sb_blocks=nsb,
        total_bat_entries=total,
        bat=bat,
    )


def _parse_metadata(fd: int, md: Region, rep: Reporter) -> list[MetaItem]:
    where = "metadata table"
    raw = pread_exact(fd, S.METADATA_TABLE_SIZE, md.offset)
    if len(raw) < S.METADATA_TABLE_SIZE:
        rep.fail(FormatError, "metadata table is truncated", where, "the file is truncated")
    th = S.MetadataTableHeader.parse(raw[:32])
    if th.signature != S.SIG_METADATA:
        rep.fail(FormatError, f"bad metadata table signature {th.signature!r}", where)
    if th.entry_count > S.MAX_TABLE_ENTRIES:
        rep.fail(FormatError, f"metadata entry count {th.entry_count} exceeds 2047", where)
    items: list[MetaItem] = []
    spans: list[tuple[int, int, str]] = []
    keys: set[tuple[uuid.UUID, bool]] = set()
    nuser = 0
    for i in range(th.entry_count):
        e = S.MetadataTableEntry.parse(raw[32 + 32 * i : 64 + 32 * i])
        is_user = bool(e.flags & S.MD_IS_USER)
        name = S.SYSTEM_ITEM_NAMES.get(e.item_id, str(e.item_id)) if not is_user else f"user item {e.item_id}"
        w = f"metadata entry {i} ({name})"
        if (e.item_id, is_user) in keys:
            rep.error(FormatError, f"{name} appears twice", w)
            continue
        keys.add((e.item_id, is_user))
        nuser += is_user
        if e.flags & ~7:
            rep.flaw(f"reserved flag bits set ({e.flags:#x})", w)
        if e.length == 0:
            rep.error(FormatError, "zero-length metadata item (spec-legal, but libvhdi rejects such files)", w)
            continue
        if e.offset < S.METADATA_TABLE_SIZE or e.length > S.MAX_ITEM_SIZE or e.offset + e.length > md.length:
            rep.error(
                FormatError,
                f"item at {e.offset}+{e.length} is outside the item area (64 KiB..{md.length}) or larger than 1 MiB",
                w,
            )
            continue
        if not is_user and e.item_id not in S.SYSTEM_ITEM_NAMES and e.flags & S.MD_IS_REQUIRED:
            rep.fail(
                UnsupportedError,
                f"unknown required metadata item {e.item_id}",
                w,
                "a newer writer made this file; it cannot be read safely",
            )
        if is_user and e.flags & S.MD_IS_REQUIRED:
            rep.error(
                UnsupportedError,
                f"user metadata item {e.item_id} is marked IsRequired",
                w,
                "qemu and Hyper-V refuse such files",
            )
        spans.append((e.offset, e.offset + e.length, name))
        items.append(MetaItem(e.item_id, e.flags, pread_exact(fd, e.length, md.offset + e.offset)))
    if nuser > S.MAX_USER_ITEMS:
        rep.error(FormatError, f"{nuser} user metadata items (at most 1024 allowed)", where)
    spans.sort()
    for a, b in pairwise(spans):
        if b[0] < a[1]:
            rep.error(FormatError, f"metadata items {a[2]} and {b[2]} overlap", where)
    return items


def _check_bat(
    bat: np.ndarray,
    cr: int,
    nblocks: int,
    size: int,
    bs: int,
    has_parent: bool,
    file_size: int,
    spans: list[tuple[int, int, str]],
    rep: Reporter,
) -> None:
    """Vectorised BAT validation: states, reserved bits, bounds and overlaps."""
    idx = np.arange(bat.size, dtype=np.int64)
    is_sb = (idx % (cr + 1)) == cr
    block = idx - idx // (cr + 1)  # payload block number for payload entries
    states = (bat & 7).astype(np.int64)
    offs = (bat & np.uint64(S.BAT_OFFSET_MASK)).astype(np.int64)

    def report(mask: np.ndarray, msg: str, kind: str = "error") -> None:
        bad = np.flatnonzero(mask)
        if bad.size:
            first = ", ".join(str(int(b)) for b in bad[:5])
            more = f" (+{bad.size - 5} more)" if bad.size > 5 else ""
            text = f"BAT: {msg} ({bad.size} entr{'y' if bad.size == 1 else 'ies'}, index {first}{more})"
            if kind == "error":
                rep.error(FormatError, text, "BAT")
            elif kind == "flaw":
                rep.flaw(text, "BAT")
            else:
                rep.warn(text, "BAT")

    report((bat & np.uint64(S.BAT_RESERVED_MASK)) != 0, "reserved bits set", "flaw")
    pay = ~is_sb
    bad_pay = pay & ((states == 4) | ((states == 7) & (not has_parent)))
    report(bad_pay, "invalid payload state")
    report(is_sb & (states != 0) & (states != 6), "invalid sector-bitmap state")
    if not has_parent:
        report(is_sb & (states == 6), "sector bitmap marked present in a non-differencing disk")
    present = (pay & ((states == 6) | (states == 7))) | (is_sb & (states == 6))
    report(pay & (block >= nblocks) & present, "present blocks beyond the virtual disk size")
    report(present & (offs < S.MiB), "present block inside the header section (offset < 1 MiB)")
    report(~present & (offs != 0), "file offset kept in a non-present state (should be 0)", "warn")
    # lengths: payload blocks (the last one may be partial), bitmaps 1 MiB
    need = np.where(is_sb, S.MiB, np.minimum(bs, np.maximum(size - block * bs, 0)))
    ends = offs + need
    report(
        present & (ends > file_size),
        f"block lies past the end of the file ({file_size} bytes): the file is probably truncated",
    )
    if has_parent:
        chunk = block // cr
        sb_idx = chunk * (cr + 1) + cr
        sb_ok = np.zeros(bat.size, dtype=bool)
        valid_sb = sb_idx < bat.size
        sb_ok[valid_sb] = states[sb_idx[valid_sb]] == 6
        report(pay & (states == 7) & ~sb_ok, "PARTIALLY_PRESENT block whose chunk has no sector bitmap")
    # overlaps among present blocks and with regions/log/header section
    pi = np.flatnonzero(present & (offs >= S.MiB))
    if pi.size:
        starts = offs[pi]
        lens = np.where(is_sb[pi], S.MiB, bs)
        order = np.argsort(starts, kind="stable")
        st, en = starts[order], starts[order] + lens[order]
        if st.size > 1:
            ov = np.flatnonzero(st[1:] < en[:-1])
            if ov.size:
                rep.error(
                    FormatError,
                    f"{ov.size} payload/bitmap blocks overlap each other (first at file offset {int(st[ov[0] + 1])})",
                    "BAT",
                )
        for a, b, nm in spans:
            hit = (st < b) & (en > a)
            if hit.any():
                rep.error(
                    FormatError,
                    f"a present block at file offset {int(st[np.flatnonzero(hit)[0]])} overlaps the {nm}",
                    "BAT",
                )
