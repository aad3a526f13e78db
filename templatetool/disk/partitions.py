"""Partition tables: GPT (both headers, CRCs, entries) and MBR, read from any BlockDevice."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError

from ..blockdev import BlockDevice, View
from ..errors import FormatError, IntegrityError, NotFoundError
from .structs import GPT_ENTRY, GPT_HEADER, MBR

# Well-known GPT partition type GUIDs.
BASIC_DATA = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")
EFI_SYSTEM = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
MS_RESERVED = uuid.UUID("e3c9e316-0b5c-4db8-817d-f92df00215ae")
WIN_RECOVERY = uuid.UUID("de94bba4-06d1-4d40-a16a-bfd50179d6ac")
LDM_METADATA = uuid.UUID("5808c8aa-7e8f-42e0-85d2-e1e90434cfb3")
LDM_DATA = uuid.UUID("af9b60a0-1431-4f62-bc68-3311714a69ad")
LINUX_FS = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")

GPT_KINDS = {
    BASIC_DATA: "basic-data",
    EFI_SYSTEM: "efi-system",
    MS_RESERVED: "ms-reserved",
    WIN_RECOVERY: "windows-recovery",
    LDM_METADATA: "ldm-metadata",
    LDM_DATA: "ldm-data",
    LINUX_FS: "linux",
}
MBR_KINDS = {
    0x07: "basic-data",
    0x0C: "fat32",
    0x0B: "fat32",
    0x0E: "fat16",
    0x06: "fat16",
    0xEF: "efi-system",
    0x27: "windows-recovery",
    0x42: "ldm-data",
    0x83: "linux",
    0xEE: "gpt-protective",
    0x05: "extended",
    0x0F: "extended",
}


@dataclass
class Partition:
    """One partition: 1-based ``index``, byte ``offset`` and ``size`` within the disk."""

    index: int
    offset: int
    size: int
    kind: str
    type_guid: uuid.UUID | None = None
    guid: uuid.UUID | None = None
    mbr_type: int | None = None
    name: str = ""
    attributes: int = 0

    def view(self, dev: BlockDevice) -> View:
        """A window over this partition of ``dev``."""
        return View(dev, self.offset, self.size, name=f"{dev.name} partition {self.index}")

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "offset": self.offset,
            "size": self.size,
            "kind": self.kind,
            "type_guid": str(self.type_guid) if self.type_guid else None,
            "guid": str(self.guid) if self.guid else None,
            "mbr_type": self.mbr_type,
            "name": self.name,
        }


@dataclass
class PartitionTable:
    """A parsed partition table. ``scheme`` is 'gpt', 'mbr' or None (no table: a bare volume)."""

    scheme: str | None
    sector_size: int
    partitions: list[Partition] = field(default_factory=list)
    disk_guid: uuid.UUID | None = None
    #: Problems found that did not prevent reading (e.g. a bad backup GPT header).
    warnings: list[str] = field(default_factory=list)

    def get(self, index: int) -> Partition:
        """Partition by 1-based index, or NotFoundError."""
        for p in self.partitions:
            if p.index == index:
                return p
        raise NotFoundError(
            f"no partition {index}", hint=f"the disk has partitions {[p.index for p in self.partitions]}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "scheme": self.scheme,
            "sector_size": self.sector_size,
            "disk_guid": str(self.disk_guid) if self.disk_guid else None,
            "partitions": [p.to_json() for p in self.partitions],
            "warnings": self.warnings,
        }


def _parse_gpt_at(dev: BlockDevice, lba: int, ss: int, where: str) -> tuple[Any, list[Partition]]:
    # Any: the header is a construct Container (construct has no types)
    raw = dev.read(lba * ss, ss)
    try:
        hdr = GPT_HEADER.parse(raw)
    except ConstructError:
        raise FormatError("no GPT header signature", f"{where}, LBA {lba}") from None
    if hdr.header_size < 92 or hdr.header_size > ss:
        raise FormatError(f"GPT header size {hdr.header_size} out of range", f"{where}, LBA {lba}")
    body = bytearray(raw[: hdr.header_size])
    body[16:20] = b"\0\0\0\0"
    if zlib.crc32(body) != hdr.header_crc32:
        raise IntegrityError("GPT header CRC mismatch", f"{where}, LBA {lba}", "the partition table is corrupt")
    if hdr.entry_size < 128 or hdr.entry_size % 8 or hdr.num_entries > 16384:
        raise FormatError(f"GPT entry geometry out of range ({hdr.num_entries} x {hdr.entry_size})", where)
    table_len = hdr.num_entries * hdr.entry_size
    if (hdr.entries_lba * ss + table_len) > dev.size:
        raise FormatError("GPT entry array lies past the end of the disk", where)
    entries = dev.read(hdr.entries_lba * ss, table_len)
    if zlib.crc32(entries) != hdr.entries_crc32:
        raise IntegrityError("GPT partition entry array CRC mismatch", where, "the partition table is corrupt")
    parts: list[Partition] = []
    for i in range(hdr.num_entries):
        e = GPT_ENTRY.parse(entries[i * hdr.entry_size : (i * hdr.entry_size) + 128])
        if e.type_guid == bytes(16):
            continue
        if e.last_lba < e.first_lba or (e.last_lba + 1) * ss > dev.size:
            raise FormatError(f"GPT partition {i + 1} extends past the end of the disk or is inverted", where)
        tg = uuid.UUID(bytes_le=e.type_guid)
        parts.append(
            Partition(
                index=i + 1,
                offset=e.first_lba * ss,
                size=(e.last_lba - e.first_lba + 1) * ss,
                kind=GPT_KINDS.get(tg, "other"),
                type_guid=tg,
                guid=uuid.UUID(bytes_le=e.unique_guid),
                name=e.name.decode("utf-16-le", "replace").rstrip("\0"),
                attributes=e.attributes,
            )
        )
    return hdr, parts


#: Logical sector sizes a GPT disk image may use (the header sits at LBA 1 = byte 512 or 4096).
GPT_SECTOR_SIZES = (512, 4096)


def gpt_sector_size(read: Callable[[int, int], bytes], size: int) -> int | None:
    """The logical sector size of a GPT disk image: 512 or 4096 by where the primary header's
    "EFI PART" signature is (LBA 1), or None (no GPT there). ``read(offset, n)`` reads the image."""
    for ss in GPT_SECTOR_SIZES:
        if size >= 2 * ss and read(ss, 8) == b"EFI PART":
            return ss
    return None


def _looks_like_boot_sector(head: bytes) -> bool:
    """A volume boot record: x86 jump then a BPB with a sane bytes-per-sector value."""
    bps = int.from_bytes(head[11:13], "little")
    return head[0] in (0xEB, 0xE9) and bps in (512, 1024, 2048, 4096)


def read_partition_table(dev: BlockDevice) -> PartitionTable:
    """Read the GPT (preferred, with backup fallback) or MBR of ``dev``.

    A device without an MBR signature is returned as ``scheme=None`` (a bare volume).
    """
    ss = dev.sector_size
    if dev.size < 2 * ss:
        return PartitionTable(None, ss)
    mbr = MBR.parse(dev.read(0, 512))
    if mbr.signature != b"\x55\xaa":
        return PartitionTable(None, ss)
    protective = any(e.type == 0xEE for e in mbr.entries)
    if not protective and _looks_like_boot_sector(dev.read(0, 16)):
        # A filesystem (or BitLocker) boot sector also ends in 55AA: a bare volume, no table.
        return PartitionTable(None, ss)
    if protective:
        table = PartitionTable("gpt", ss)
        try:
            hdr, parts = _parse_gpt_at(dev, 1, ss, "primary GPT")
        except (FormatError, IntegrityError) as primary_err:
            last = dev.size // ss - 1
            try:
                hdr, parts = _parse_gpt_at(dev, last, ss, "backup GPT")
            except (FormatError, IntegrityError):
                raise primary_err from None
            table.warnings.append(f"primary GPT unusable ({primary_err}); using the backup header")
        else:
            backup_lba = hdr.backup_lba
            if backup_lba * ss >= dev.size:
                table.warnings.append("backup GPT header lies past the end of the disk")
            else:
                try:
                    _parse_gpt_at(dev, backup_lba, ss, "backup GPT")
                except (FormatError, IntegrityError) as e:
                    table.warnings.append(f"backup GPT header invalid: {e}")
        table.disk_guid = uuid.UUID(bytes_le=hdr.disk_guid)
        table.partitions = parts
        return table
    table = PartitionTable("mbr", ss)
    for i, ent in enumerate(mbr.entries):
        if ent.type == 0 or ent.sectors == 0:
            continue
        off, size = ent.lba_first * ss, ent.sectors * ss
        if off + size > dev.size:
            raise FormatError(f"MBR partition {i + 1} extends past the end of the disk", dev.name)
        table.partitions.append(
            Partition(index=i + 1, offset=off, size=size, kind=MBR_KINDS.get(ent.type, "other"), mbr_type=ent.type)
        )
    return table
