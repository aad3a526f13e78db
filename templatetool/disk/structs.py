"""On-disk structures of partition tables (MBR, GPT), declared with construct."""

from __future__ import annotations

from construct import Array, Bytes, Const, Int8ul, Int32ul, Int64ul, Padding, Struct

MBR_ENTRY = Struct(
    "status" / Int8ul,
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_first" / Int32ul,
    "sectors" / Int32ul,
)

MBR = Struct(
    "boot_code" / Bytes(440),
    "disk_signature" / Int32ul,
    "reserved" / Bytes(2),
    "entries" / Array(4, MBR_ENTRY),
    "signature" / Bytes(2),
)

GPT_HEADER = Struct(
    "signature" / Const(b"EFI PART"),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "current_lba" / Int64ul,
    "backup_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "entries_lba" / Int64ul,
    "num_entries" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc32" / Int32ul,
)

GPT_ENTRY = Struct(
    "type_guid" / Bytes(16),
    "unique_guid" / Bytes(16),
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,
    "attributes" / Int64ul,
    "name" / Bytes(72),
)

__all__ = ["GPT_ENTRY", "GPT_HEADER", "MBR", "MBR_ENTRY", "Padding"]
