"""Serialise VHDX structures (headers, region tables, metadata region, parent locator)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from .. import __version__
from ..errors import UsageError
from . import structs as S
from .layout import MetaItem, Region, align_up, with_crc


def file_identifier() -> bytes:
    """The 64 KiB file type identifier block with our creator string."""
    creator = f"templatetool {__version__}".encode("utf-16-le")
    raw: bytes = S.FileIdentifier.build({"signature": S.SIG_FILE, "creator": creator.ljust(512, b"\0")})
    return raw.ljust(64 * S.KiB, b"\0")


def header(
    seq: int,
    file_write_guid: uuid.UUID,
    data_write_guid: uuid.UUID,
    log_guid: uuid.UUID | None = None,
    log_offset: int = S.MiB,
    log_length: int = S.MiB,
) -> bytes:
    """A 4 KiB header with its CRC-32C."""
    raw = S.Header.build(
        {
            "signature": S.SIG_HEADER,
            "checksum": 0,
            "sequence_number": seq,
            "file_write_guid": file_write_guid,
            "data_write_guid": data_write_guid,
            "log_guid": log_guid or uuid.UUID(int=0),
            "log_version": 0,
            "version": 1,
            "log_length": log_length,
            "log_offset": log_offset,
            "reserved": bytes(4016),
        }
    )
    return with_crc(raw, S.HEADER_CHECKSUM_OFFSET)


def region_table(regions: Sequence[Region]) -> bytes:
    """A 64 KiB region table with its CRC-32C."""
    buf = bytearray(S.REGION_TABLE_SIZE)
    buf[0:16] = S.RegionTableHeader.build(
        {"signature": S.SIG_REGION, "checksum": 0, "entry_count": len(regions), "reserved": 0}
    )
    for i, r in enumerate(regions):
        buf[16 + 32 * i : 48 + 32 * i] = S.RegionTableEntry.build(
            {"guid": r.guid, "file_offset": r.offset, "length": r.length, "required": r.required}
        )
    return with_crc(buf, S.REGION_CHECKSUM_OFFSET)


def metadata_region(items: Sequence[MetaItem], min_length: int = S.MiB) -> bytes:
    """Pack the metadata table and items (from 64 KiB on) into a 1 MiB-multiple region."""
    if len(items) > S.MAX_TABLE_ENTRIES:
        raise UsageError(f"too many metadata items ({len(items)}; at most 2047)")
    need = S.METADATA_TABLE_SIZE + sum(len(it.data) for it in items)
    length = max(min_length, align_up(need, S.MiB))
    buf = bytearray(length)
    buf[0:32] = S.MetadataTableHeader.build(
        {"signature": S.SIG_METADATA, "reserved": 0, "entry_count": len(items), "reserved2": bytes(20)}
    )
    pos = S.METADATA_TABLE_SIZE
    for i, it in enumerate(items):
        if not it.data:
            raise UsageError("refusing to write a zero-length metadata item", str(it.item_id))
        buf[32 + 32 * i : 64 + 32 * i] = S.MetadataTableEntry.build(
            {"item_id": it.item_id, "offset": pos, "length": len(it.data), "flags": it.flags, "reserved2": 0}
        )
        buf[pos : pos + len(it.data)] = it.data
        pos += len(it.data)
    return bytes(buf)


def parent_locator(pairs: dict[str, str]) -> bytes:
    """A VHDX parent locator item (UTF-16LE keys/values, no terminators)."""
    n = len(pairs)
    strings = bytearray()
    entries = bytearray()
    base = 20 + 12 * n
    for k, v in pairs.items():
        kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
        koff = base + len(strings)
        strings += kb
        voff = base + len(strings)
        strings += vb
        entries += S.ParentLocatorEntry.build(
            {"key_offset": koff, "value_offset": voff, "key_length": len(kb), "value_length": len(vb)}
        )
    head: bytes = S.ParentLocatorHeader.build(
        {"locator_type": S.VHDX_PARENT_LOCATOR_TYPE, "reserved": 0, "key_value_count": n}
    )
    return head + bytes(entries) + bytes(strings)


def system_items(
    block_size: int, flags: int, size: int, disk_id: uuid.UUID, lss: int, pss: int, locator: bytes | None = None
) -> list[MetaItem]:
    """The system metadata items, flagged as Windows writes them."""
    req, vd = S.MD_IS_REQUIRED, S.MD_IS_REQUIRED | S.MD_IS_VIRTUAL_DISK
    items = [
        MetaItem(S.FILE_PARAMETERS, req, S.FileParameters.build({"block_size": block_size, "flags": flags})),
        MetaItem(S.VIRTUAL_DISK_SIZE, vd, size.to_bytes(8, "little")),
        MetaItem(S.VIRTUAL_DISK_ID, vd, disk_id.bytes_le),
        MetaItem(S.LOGICAL_SECTOR_SIZE, vd, lss.to_bytes(4, "little")),
        MetaItem(S.PHYSICAL_SECTOR_SIZE, vd, pss.to_bytes(4, "little")),
    ]
    if locator is not None:
        items.append(MetaItem(S.PARENT_LOCATOR, req, locator))
    return items
