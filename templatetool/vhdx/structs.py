"""[MS-VHDX] on-disk structures, declared with ``construct`` (no logic here).

All integers are little-endian; GUIDs are stored in Microsoft mixed-endian form
(``uuid.UUID(bytes_le=...)``). Signatures are parsed as plain bytes so that the reader can
report a clear error instead of a construct exception.
"""

from __future__ import annotations

import uuid
from enum import IntEnum, IntFlag

from construct import Adapter, Bytes, Int16ul, Int32ul, Int64ul, Struct

KiB = 1 << 10
MiB = 1 << 20

# --- fixed layout -------------------------------------------------------------------------
FILE_ID_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
ALIGN = MiB
SECTOR_BITMAP_BLOCK = MiB
MAX_TABLE_ENTRIES = 2047
MAX_USER_ITEMS = 1024
MAX_ITEM_SIZE = MiB
MAX_DISK_SIZE = 64 << 40
LOG_SECTOR = 4 * KiB

SIG_FILE = b"vhdxfile"
SIG_HEADER = b"head"
SIG_REGION = b"regi"
SIG_METADATA = b"metadata"
SIG_LOG_ENTRY = b"loge"

# --- GUIDs --------------------------------------------------------------------------------
BAT_REGION = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

SYSTEM_ITEM_NAMES = {
    FILE_PARAMETERS: "FileParameters",
    VIRTUAL_DISK_SIZE: "VirtualDiskSize",
    VIRTUAL_DISK_ID: "VirtualDiskId",
    LOGICAL_SECTOR_SIZE: "LogicalSectorSize",
    PHYSICAL_SECTOR_SIZE: "PhysicalSectorSize",
    PARENT_LOCATOR: "ParentLocator",
}
#: Expected lengths of the fixed-size system items.
SYSTEM_ITEM_LENGTHS = {
    FILE_PARAMETERS: 8,
    VIRTUAL_DISK_SIZE: 8,
    VIRTUAL_DISK_ID: 16,
    LOGICAL_SECTOR_SIZE: 4,
    PHYSICAL_SECTOR_SIZE: 4,
}


# Metadata entry flags
class MetadataFlag(IntFlag):
    """Metadata table entry flags ([MS-VHDX] 2.6.1.2)."""

    IS_USER = 1
    IS_VIRTUAL_DISK = 2
    IS_REQUIRED = 4


MD_IS_USER = MetadataFlag.IS_USER
MD_IS_VIRTUAL_DISK = MetadataFlag.IS_VIRTUAL_DISK
MD_IS_REQUIRED = MetadataFlag.IS_REQUIRED


# File Parameters flags
class FileParameterFlag(IntFlag):
    """File Parameters metadata flags ([MS-VHDX] 2.6.2.1)."""

    LEAVE_BLOCK_ALLOCATED = 1
    HAS_PARENT = 2


FP_LEAVE_BLOCK_ALLOCATED = FileParameterFlag.LEAVE_BLOCK_ALLOCATED
FP_HAS_PARENT = FileParameterFlag.HAS_PARENT


# BAT states
class PayloadBlockState(IntEnum):
    """Payload BAT entry state ([MS-VHDX] 2.5.1.1); 5 is the v0.95 spelling of UNMAPPED."""

    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    UNMAPPED_V095 = 5
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


class SectorBitmapState(IntEnum):
    """Sector-bitmap BAT entry state ([MS-VHDX] 2.5.1.2)."""

    NOT_PRESENT = 0
    PRESENT = 6


PAYLOAD_BLOCK_NOT_PRESENT = PayloadBlockState.NOT_PRESENT
PAYLOAD_BLOCK_UNDEFINED = PayloadBlockState.UNDEFINED
PAYLOAD_BLOCK_ZERO = PayloadBlockState.ZERO
PAYLOAD_BLOCK_UNMAPPED = PayloadBlockState.UNMAPPED
PAYLOAD_BLOCK_UNMAPPED_V095 = PayloadBlockState.UNMAPPED_V095
PAYLOAD_BLOCK_FULLY_PRESENT = PayloadBlockState.FULLY_PRESENT
PAYLOAD_BLOCK_PARTIALLY_PRESENT = PayloadBlockState.PARTIALLY_PRESENT
SB_BLOCK_NOT_PRESENT = SectorBitmapState.NOT_PRESENT
SB_BLOCK_PRESENT = SectorBitmapState.PRESENT
BAT_STATE_MASK = 7
BAT_OFFSET_MASK = ~((1 << 20) - 1) & 0xFFFFFFFFFFFFFFFF
BAT_RESERVED_MASK = ((1 << 20) - 1) & ~7


class GuidAdapter(Adapter):  # type: ignore[misc]
    """16 bytes in Microsoft mixed-endian order <-> ``uuid.UUID``."""

    def _decode(self, obj: bytes, context: object, path: object) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(obj))

    def _encode(self, obj: uuid.UUID, context: object, path: object) -> bytes:
        return obj.bytes_le


Guid = GuidAdapter(Bytes(16))

FileIdentifier = Struct(
    "signature" / Bytes(8),
    "creator" / Bytes(512),  # UTF-16LE, informational
)

Header = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Guid,
    "data_write_guid" / Guid,
    "log_guid" / Guid,
    "log_version" / Int16ul,
    "version" / Int16ul,
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
    "reserved" / Bytes(4016),
)
HEADER_CHECKSUM_OFFSET = 4

RegionTableHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_count" / Int32ul,
    "reserved" / Int32ul,
)
REGION_CHECKSUM_OFFSET = 4

RegionTableEntry = Struct(
    "guid" / Guid,
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "required" / Int32ul,
)

MetadataTableHeader = Struct(
    "signature" / Bytes(8),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    "reserved2" / Bytes(20),
)

MetadataTableEntry = Struct(
    "item_id" / Guid,
    "offset" / Int32ul,
    "length" / Int32ul,
    "flags" / Int32ul,
    "reserved2" / Int32ul,
)

FileParameters = Struct(
    "block_size" / Int32ul,
    "flags" / Int32ul,
)

ParentLocatorHeader = Struct(
    "locator_type" / Guid,
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)

ParentLocatorEntry = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)

LogEntryHeader = Struct(
    "signature" / Bytes(4),
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Guid,
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)
LOG_ENTRY_CHECKSUM_OFFSET = 4
