"""Generator for the malformed-VHDX corpus: each case starts from a valid file we write and breaks
one thing (recomputing CRCs where the CRC is not the point).

``build_corpus(folder)`` returns {case name: Case}. Files are small (8 MiB virtual, sparse).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from templatetool.vhdx import create_vhdx
from templatetool.vhdx import structs as S
from templatetool.vhdx.build import region_table
from templatetool.vhdx.layout import Region, with_crc
from templatetool.vhdx.writer import ParentLink, write_new_vhdx

MiB = 1 << 20


@dataclass
class Case:
    path: Path
    convert_code: int | None  # expected `vhdx convert` exit code (None: any clean error)
    convertible_as_raw: bool = False  # not a VHDX at all: convert treats it as a raw image


# --- low-level patch helpers --------------------------------------------------------------------

def _rw(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def _read(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def patch_headers(path: Path, fix_crc: bool = True, slots: tuple[int, ...] = (0, 1), **fields: object) -> None:
    for slot in slots:
        off = S.HEADER_OFFSETS[slot]
        h = S.Header.parse(_read(path, off, S.HEADER_SIZE))
        for k, v in fields.items():
            h[k] = v
        raw = S.Header.build(h)
        if fix_crc:
            raw = with_crc(raw, S.HEADER_CHECKSUM_OFFSET)
        _rw(path, off, raw)


def read_regions(path: Path) -> list[Region]:
    raw = _read(path, S.REGION_TABLE_OFFSETS[0], S.REGION_TABLE_SIZE)
    n = S.RegionTableHeader.parse(raw[:16]).entry_count
    out = []
    for i in range(n):
        e = S.RegionTableEntry.parse(raw[16 + 32 * i:48 + 32 * i])
        out.append(Region(e.guid, e.file_offset, e.length, e.required))
    return out


def write_regions(path: Path, regions: list[Region], tables: tuple[int, ...] = (0, 1)) -> None:
    raw = region_table(regions)
    for t in tables:
        _rw(path, S.REGION_TABLE_OFFSETS[t], raw)


def region(path: Path, guid: uuid.UUID) -> Region:
    return next(r for r in read_regions(path) if r.guid == guid)


def read_md_entries(path: Path) -> list[dict]:
    md = region(path, S.METADATA_REGION)
    raw = _read(path, md.offset, S.METADATA_TABLE_SIZE)
    n = S.MetadataTableHeader.parse(raw[:32]).entry_count
    return [dict(S.MetadataTableEntry.parse(raw[32 + 32 * i:64 + 32 * i])) for i in range(n)]


def write_md_entries(path: Path, entries: list[dict]) -> None:
    md = region(path, S.METADATA_REGION)
    buf = bytearray(S.METADATA_TABLE_SIZE)
    buf[:32] = S.MetadataTableHeader.build({"signature": S.SIG_METADATA, "reserved": 0,
                                            "entry_count": len(entries), "reserved2": bytes(20)})
    for i, e in enumerate(entries):
        e = {k: v for k, v in e.items() if not k.startswith("_")}
        buf[32 + 32 * i:64 + 32 * i] = S.MetadataTableEntry.build(e)
    _rw(path, md.offset, bytes(buf))


def md_item(path: Path, guid: uuid.UUID) -> tuple[dict, int]:
    md = region(path, S.METADATA_REGION)
    e = next(x for x in read_md_entries(path) if x["item_id"] == guid)
    return e, md.offset + e["offset"]


def set_bat(path: Path, idx: int, value: int) -> None:
    bat = region(path, S.BAT_REGION)
    _rw(path, bat.offset + 8 * idx, value.to_bytes(8, "little"))


# --- the base file ------------------------------------------------------------------------------

def make_base(path: Path) -> Path:
    """8 MiB dynamic VHDX, 1 MiB blocks, blocks 0, 2 and 7 written."""
    d = create_vhdx(path, 8 * MiB, block_size=MiB)
    try:
        d.write(0, b"A" * 4096)
        d.write(2 * MiB + 512, b"B" * 8192)
        d.write(8 * MiB - 4096, b"C" * 4096)
    finally:
        d.close()
    return path


def _copy(base: Path, folder: Path, name: str) -> Path:
    p = folder / f"{name}.vhdx"
    shutil.copyfile(base, p)
    return p


def build_corpus(folder: Path) -> dict[str, Case]:
    folder.mkdir(parents=True, exist_ok=True)
    base = make_base(folder / "_base.vhdx.src")
    cases: dict[str, Case] = {}

    def case(name: str, convert_code: int | None = None, raw: bool = False) -> Path:
        p = _copy(base, folder, name)
        cases[name] = Case(p, convert_code, raw)
        return p

    # signature / truncation
    p = case("bad_signature", raw=True)
    _rw(p, 0, b"vhdxfilX")
    p = case("empty_file", 2)
    p.write_bytes(b"")
    p = case("truncated_header_section", 3)
    os.truncate(p, 100 * 1024)
    p = case("truncated_metadata", 3)
    os.truncate(p, 2 * MiB + 4096)
    p = case("truncated_data", 3)
    os.truncate(p, os.path.getsize(p) - MiB + 4096)
    p = case("garbage_after_signature")
    _rw(p, 8, os.urandom(MiB))

    # headers
    p = case("both_headers_bad_crc", 4)
    patch_headers(p, fix_crc=False, sequence_number=77)
    p = case("header_version_2", 7)
    patch_headers(p, version=2)
    p = case("headers_equal_seq_differ", 3)
    patch_headers(p, slots=(0,), sequence_number=5, file_write_guid=uuid.uuid4())
    patch_headers(p, slots=(1,), sequence_number=5)
    p = case("log_version_1", 7)
    patch_headers(p, log_version=1)
    p = case("log_misaligned", 3)
    patch_headers(p, log_offset=MiB + 4096)

    # non-empty log: one valid entry under the headers' LogGuid
    p = case("non_empty_log", 7)
    lg = uuid.uuid4()
    entry = bytearray(4096)
    size = os.path.getsize(p)
    entry[:64] = S.LogEntryHeader.build({
        "signature": S.SIG_LOG_ENTRY, "checksum": 0, "entry_length": 4096, "tail": 0, "sequence_number": 1,
        "descriptor_count": 0, "reserved": 0, "log_guid": lg, "flushed_file_offset": size,
        "last_file_offset": size})
    _rw(p, MiB, with_crc(bytes(entry), S.LOG_ENTRY_CHECKSUM_OFFSET))
    patch_headers(p, log_guid=lg)

    # region tables
    p = case("region_table_1_bad_crc", 4)
    _rw(p, S.REGION_TABLE_OFFSETS[0] + 60000, b"\x01")
    p = case("region_tables_both_bad_crc", 4)
    for off in S.REGION_TABLE_OFFSETS:
        _rw(p, off + 60000, b"\x01")
    p = case("region_table_bad_signature", 3)
    for off in S.REGION_TABLE_OFFSETS:
        raw = bytearray(_read(p, off, S.REGION_TABLE_SIZE))
        raw[:4] = b"regx"
        _rw(p, off, with_crc(bytes(raw), 4))
    p = case("region_tables_differ", 3)
    regs = read_regions(p)
    write_regions(p, regs + [Region(uuid.uuid4(), 40 * MiB, MiB, 0)], tables=(1,))
    p = case("overlapping_regions", 3)
    regs = read_regions(p)
    md = next(r for r in regs if r.guid == S.METADATA_REGION)
    write_regions(p, [Region(r.guid, md.offset, r.length, r.required) if r.guid == S.BAT_REGION else r
                      for r in regs])
    p = case("region_overlaps_log", 3)
    regs = read_regions(p)
    write_regions(p, [Region(r.guid, MiB, r.length, r.required) if r.guid == S.BAT_REGION else r for r in regs])
    p = case("unknown_required_region", 7)
    write_regions(p, read_regions(p) + [Region(uuid.uuid4(), 5 * MiB, MiB, 1)])
    p = case("missing_bat_region", 3)
    write_regions(p, [r for r in read_regions(p) if r.guid != S.BAT_REGION])
    p = case("region_misaligned", 3)
    write_regions(p, [Region(r.guid, r.offset + 4096, r.length, r.required) if r.guid == S.BAT_REGION else r
                      for r in read_regions(p)])

    # BAT
    p = case("bat_entry_past_eof", 3)
    set_bat(p, 3, (1 << 30) | S.PAYLOAD_BLOCK_FULLY_PRESENT)
    p = case("bat_partially_present_in_dynamic", 3)
    set_bat(p, 4, (20 * MiB) | S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    p = case("bat_state_4", 3)
    set_bat(p, 1, 4)
    p = case("bat_blocks_overlap", 3)
    bat_r = region(p, S.BAT_REGION)
    e0 = int.from_bytes(_read(p, bat_r.offset, 8), "little")
    set_bat(p, 5, e0)
    p = case("bat_block_in_header_section", 3)
    set_bat(p, 1, S.PAYLOAD_BLOCK_FULLY_PRESENT)  # offset 0
    p = case("bat_block_over_metadata", 3)
    set_bat(p, 1, region(p, S.METADATA_REGION).offset | S.PAYLOAD_BLOCK_FULLY_PRESENT)

    # metadata
    p = case("metadata_bad_signature", 3)
    _rw(p, region(p, S.METADATA_REGION).offset, b"metadatX")
    p = case("zero_length_item", 3)
    ents = read_md_entries(p)
    ents.append({"item_id": uuid.uuid4(), "offset": 0, "length": 0, "flags": S.MD_IS_USER, "reserved2": 0})
    write_md_entries(p, ents)
    p = case("unknown_required_item", 7)
    ents = read_md_entries(p)
    ents.append({"item_id": uuid.uuid4(), "offset": 0x18000, "length": 16, "flags": S.MD_IS_REQUIRED,
                 "reserved2": 0})
    write_md_entries(p, ents)
    p = case("user_item_required", 7)
    ents = read_md_entries(p)
    ents.append({"item_id": uuid.uuid4(), "offset": 0x18000, "length": 16,
                 "flags": S.MD_IS_USER | S.MD_IS_REQUIRED, "reserved2": 0})
    write_md_entries(p, ents)
    p = case("overlapping_items", 3)
    ents = read_md_entries(p)
    ents[1]["offset"] = ents[0]["offset"]
    write_md_entries(p, ents)
    p = case("item_inside_table", 3)
    ents = read_md_entries(p)
    ents[2]["offset"] = 0x100
    write_md_entries(p, ents)
    p = case("item_past_region", 3)
    ents = read_md_entries(p)
    ents[2]["offset"] = MiB - 4
    write_md_entries(p, ents)
    p = case("missing_disk_size_item", 3)
    write_md_entries(p, [e for e in read_md_entries(p) if e["item_id"] != S.VIRTUAL_DISK_SIZE])
    p = case("duplicate_item", 3)
    ents = read_md_entries(p)
    write_md_entries(p, ents + [dict(ents[0])])
    p = case("file_parameters_flags_3", 3)
    _, off = md_item(p, S.FILE_PARAMETERS)
    _rw(p, off, S.FileParameters.build({"block_size": MiB, "flags": 3}))
    p = case("bad_block_size", 3)
    _, off = md_item(p, S.FILE_PARAMETERS)
    _rw(p, off, S.FileParameters.build({"block_size": 3 * MiB, "flags": 0}))
    p = case("bad_logical_sector_size", 3)
    _, off = md_item(p, S.LOGICAL_SECTOR_SIZE)
    _rw(p, off, (1024).to_bytes(4, "little"))
    p = case("disk_size_not_sector_multiple", 3)
    _, off = md_item(p, S.VIRTUAL_DISK_SIZE)
    _rw(p, off, (8 * MiB + 100).to_bytes(8, "little"))
    p = case("has_parent_without_locator", 3)
    _, off = md_item(p, S.FILE_PARAMETERS)
    _rw(p, off, S.FileParameters.build({"block_size": MiB, "flags": S.FP_HAS_PARENT}))

    # parent chains
    pdir = folder / "parents"
    pdir.mkdir(exist_ok=True)
    parent = pdir / "parent.vhdx"
    shutil.copyfile(base, parent)
    child = create_vhdx(folder / "missing_parent.vhdx", None, parent=parent)
    child.write(MiB, b"D" * 512)
    child.close()
    cases["missing_parent"] = Case(folder / "missing_parent.vhdx", 9)
    os.replace(parent, pdir / "gone.vhdx.bak")  # the child now points at a file that is not there

    mdir = folder / "moved_from"
    mdir.mkdir(exist_ok=True)
    mparent = mdir / "mparent.vhdx"
    shutil.copyfile(base, mparent)
    create_vhdx(folder / "moved_parent.vhdx", None, parent=mparent).close()
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    os.replace(mparent, elsewhere / "mparent.vhdx")
    cases["moved_parent"] = Case(folder / "moved_parent.vhdx", 9)

    dparent = folder / "dwg_parent.vhdx.src"
    shutil.copyfile(base, dparent)
    create_vhdx(folder / "dwg_mismatch.vhdx", None, parent=dparent).close()
    from templatetool.vhdx import open_vhdx

    with open_vhdx(dparent, writable=True) as d:
        d.write(0, b"changed")  # rotates the parent's DataWriteGuid: the child's link breaks
    cases["dwg_mismatch"] = Case(folder / "dwg_mismatch.vhdx", 4)

    # cycles: a child that is its own parent, and two disks pointing at each other
    g = uuid.uuid4()
    selfp = folder / "parent_cycle_self.vhdx"
    write_new_vhdx(selfp, 8 * MiB, "differencing", MiB, parent=ParentLink(g, "parent_cycle_self.vhdx", None,
                                                                            uuid.uuid4()), data_write_guid=g)
    cases["parent_cycle_self"] = Case(selfp, 3)
    ga, gb, did = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    write_new_vhdx(folder / "parent_cycle_a.vhdx", 8 * MiB, "differencing", MiB,
                   parent=ParentLink(gb, "cycle_b.vhdx.src", None, did), data_write_guid=ga)
    write_new_vhdx(folder / "cycle_b.vhdx.src", 8 * MiB, "differencing", MiB,
                   parent=ParentLink(ga, "parent_cycle_a.vhdx", None, did), data_write_guid=gb)
    cases["parent_cycle_a"] = Case(folder / "parent_cycle_a.vhdx", 3)
    return cases


# --- a file with an unreplayed log (as a crash between logging and applying would leave it) ------

def log_entry(seq: int, tail: int, log_guid: uuid.UUID, file_size: int,
              zeros: list[tuple[int, int]], datas: list[tuple[int, bytes]]) -> bytes:
    """One log entry: zero descriptors, then data descriptors with their 4 KiB data sectors."""
    nd = len(zeros) + len(datas)
    desc_sectors = -(-(nd + 2) // 128)
    length = (desc_sectors + len(datas)) * 4096
    buf = bytearray(length)
    buf[:64] = S.LogEntryHeader.build({
        "signature": S.SIG_LOG_ENTRY, "checksum": 0, "entry_length": length, "tail": tail,
        "sequence_number": seq, "descriptor_count": nd, "reserved": 0, "log_guid": log_guid,
        "flushed_file_offset": file_size, "last_file_offset": file_size})
    pos = 64
    for off, n in zeros:
        buf[pos:pos + 32] = (b"zero" + bytes(4) + n.to_bytes(8, "little") + off.to_bytes(8, "little")
                             + seq.to_bytes(8, "little"))
        pos += 32
    dpos = desc_sectors * 4096
    for off, data in datas:
        assert len(data) == 4096
        buf[pos:pos + 32] = (b"desc" + data[4092:4096] + data[0:8] + off.to_bytes(8, "little")
                             + seq.to_bytes(8, "little"))
        pos += 32
        buf[dpos:dpos + 4096] = (b"data" + (seq >> 32).to_bytes(4, "little") + data[8:4092]
                                 + (seq & 0xFFFFFFFF).to_bytes(4, "little"))
        dpos += 4096
    return with_crc(bytes(buf), S.LOG_ENTRY_CHECKSUM_OFFSET)


def make_dirty_log(path: Path) -> bytes:
    """Turn the dynamic VHDX ``path`` (1 MiB blocks, 512-byte sectors) into one with an unreplayed log.

    Two payload blocks are appended at the end of the file; the active log sequence (entries with
    sequence numbers 10 and 11) points BAT entries 3 and 5 at them and drops block 0; an older,
    inactive entry (sequence 2) would point block 1 at garbage. Returns the expected disk content
    after a correct replay.
    """
    from templatetool.vhdx import open_vhdx

    with open_vhdx(path) as d:
        expected = bytearray(d.read(0, d.size))
        assert d.block_size == MiB and d.logical_sector_size == 512
    size = os.path.getsize(path)
    x = -(-size // MiB) * MiB
    a, b = bytes([0xA5]) * MiB, os.urandom(MiB)
    _rw(path, x, a)
    _rw(path, x + MiB, b)
    _rw(path, x + 2 * MiB, os.urandom(MiB))  # garbage for the inactive entry
    file_size = x + 3 * MiB
    bat = region(path, S.BAT_REGION)
    sector0 = bytearray(_read(path, bat.offset, 4096))

    def with_entries(base: bytes, changes: dict[int, int]) -> bytes:
        s = bytearray(base)
        for idx, val in changes.items():
            s[8 * idx:8 * idx + 8] = val.to_bytes(8, "little")
        return bytes(s)

    step1 = with_entries(sector0, {0: 0, 3: x | S.PAYLOAD_BLOCK_FULLY_PRESENT})
    step2 = with_entries(step1, {5: (x + MiB) | S.PAYLOAD_BLOCK_FULLY_PRESENT})
    stale = with_entries(sector0, {1: (x + 2 * MiB) | S.PAYLOAD_BLOCK_FULLY_PRESENT})
    lg = uuid.uuid4()
    e1 = log_entry(10, 0, lg, file_size, zeros=[(bat.offset, 4096)], datas=[(bat.offset, step1)])
    e2 = log_entry(11, 0, lg, file_size, zeros=[], datas=[(bat.offset, step2)])
    old = log_entry(2, 64 * 1024, lg, file_size, zeros=[], datas=[(bat.offset, stale)])
    log_off = S.Header.parse(_read(path, S.HEADER_OFFSETS[0], S.HEADER_SIZE)).log_offset
    _rw(path, log_off, e1 + e2)
    _rw(path, log_off + 64 * 1024, old)
    patch_headers(path, log_guid=lg)
    expected[0:MiB] = bytes(MiB)
    expected[3 * MiB:4 * MiB] = a
    expected[5 * MiB:6 * MiB] = b
    return bytes(expected)
