"""BitLocker (FVE) on-disk structures, declared with ``construct``.

Field names follow the reference note (docs/bitlocker.md, ../shared/reference/bitlocker-format.md)
with the Microsoft-style name in comments. All integers are little-endian. The structures carry
raw values only; every rule (signatures, ranges, CRCs) is checked in :mod:`.metadata`, so that a
malformed input produces a typed error naming the field instead of a construct exception.
"""

from __future__ import annotations

import uuid
from enum import IntEnum
from typing import Any

from construct import (
    Array,
    Bytes,
    Construct,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Struct,
)

#: ``-FVE-FS-``: signature of the FVE volume header (boot sector) and of every metadata block.
FVE_SIGNATURE = b"-FVE-FS-"
#: OEM name of a BitLocker To Go volume header (the FAT32 "discovery volume" boot sector).
TO_GO_SIGNATURE = b"MSWIN4.1"
#: Volume layouts: the fixed-disk ``-FVE-FS-`` header, or the To Go (removable media) header.
LAYOUT_STANDARD = "standard"
LAYOUT_TO_GO = "to-go"
#: Where the BitLocker identifier sits in each layout's volume header.
IDENTIFIER_OFFSET = {LAYOUT_STANDARD: 0x0A0, LAYOUT_TO_GO: 0x1A8}
#: The BitLocker identifier at boot-sector offset 0xA0 (Windows 7 and later), stored bytes_le.
BITLOCKER_GUID = uuid.UUID("4967d63b-2e29-4ad8-8399-f6a339e3d001")
#: The "used-space-only / EOW" identifier (read-only support in readers; we never write it).
BITLOCKER_EOW_GUID = uuid.UUID("92a84d3b-dd80-4d0e-9e4e-b1e3284eaed8")
#: Jump bytes Windows 7+ writes (libbde requires exactly these).
BOOT_JUMP = b"\xeb\x58\x90"
BOOT_JUMP_VISTA = b"\xeb\x52\x90"

#: Size of the region reserved for each metadata copy.
METADATA_REGION_SIZE = 64 * 1024
#: Size of the relocated volume header (VHO) region: 16 x 512 or 2 x 4096.
VHO_REGION_SIZE = 8 * 1024


# --- encryption methods (dataset FvekType / KEY key type) ---------------------------------
class Method(IntEnum):
    """Encryption method (dataset ``method``, FVEK KEY key type)."""

    AES_128_DIFFUSER = 0x8000
    AES_256_DIFFUSER = 0x8001
    AES_128_CBC = 0x8002
    AES_256_CBC = 0x8003
    XTS_AES_128 = 0x8004
    XTS_AES_256 = 0x8005


METHOD_AES_128_DIFFUSER = Method.AES_128_DIFFUSER
METHOD_AES_256_DIFFUSER = Method.AES_256_DIFFUSER
METHOD_AES_128_CBC = Method.AES_128_CBC
METHOD_AES_256_CBC = Method.AES_256_CBC
METHOD_XTS_AES_128 = Method.XTS_AES_128
METHOD_XTS_AES_256 = Method.XTS_AES_256

METHOD_NAMES: dict[int, str] = {
    METHOD_AES_128_DIFFUSER: "aes-128-cbc-diffuser",
    METHOD_AES_256_DIFFUSER: "aes-256-cbc-diffuser",
    METHOD_AES_128_CBC: "aes-128-cbc",
    METHOD_AES_256_CBC: "aes-256-cbc",
    METHOD_XTS_AES_128: "xts-aes-128",
    METHOD_XTS_AES_256: "xts-aes-256",
}
#: FVEK length in bytes per method (the KEY payload size).
FVEK_LENGTH: dict[int, int] = {
    METHOD_AES_128_DIFFUSER: 64,
    METHOD_AES_256_DIFFUSER: 64,
    METHOD_AES_128_CBC: 16,
    METHOD_AES_256_CBC: 32,
    METHOD_XTS_AES_128: 32,
    METHOD_XTS_AES_256: 64,
}


# --- entry roles ("entry type") -------------------------------------------------------------
class Role(IntEnum):
    """Entry role ("entry type")."""

    PROPERTY = 0x0000
    VMK = 0x0002
    FVEK = 0x0003
    VALIDATION = 0x0004
    STARTUP_KEY = 0x0006
    DESCRIPTION = 0x0007
    FVEK_BACKUP = 0x000B
    VOLUME_HEADER_BLOCK = 0x000F
    RECOVERY_KEY_COPY = 0x0012  # nested in the recovery stretch key: VMK-encrypted raw key16


ROLE_PROPERTY = Role.PROPERTY
ROLE_VMK = Role.VMK
ROLE_FVEK = Role.FVEK
ROLE_VALIDATION = Role.VALIDATION
ROLE_STARTUP_KEY = Role.STARTUP_KEY
ROLE_DESCRIPTION = Role.DESCRIPTION
ROLE_FVEK_BACKUP = Role.FVEK_BACKUP
ROLE_VOLUME_HEADER_BLOCK = Role.VOLUME_HEADER_BLOCK
ROLE_RECOVERY_KEY_COPY = Role.RECOVERY_KEY_COPY


# --- value types --------------------------------------------------------------------------
class ValueType(IntEnum):
    """Entry value type (how the payload is laid out)."""

    ERASED = 0x0000
    KEY = 0x0001
    UNICODE = 0x0002
    STRETCH_KEY = 0x0003
    USE_KEY = 0x0004
    AES_CCM = 0x0005
    TPM_ENCODED = 0x0006
    VALIDATION = 0x0007
    VMK = 0x0008
    EXTERNAL_KEY = 0x0009
    UPDATE = 0x000A
    ERROR = 0x000B
    OFFSET_SIZE = 0x000F


VT_ERASED = ValueType.ERASED
VT_KEY = ValueType.KEY
VT_UNICODE = ValueType.UNICODE
VT_STRETCH_KEY = ValueType.STRETCH_KEY
VT_USE_KEY = ValueType.USE_KEY
VT_AES_CCM = ValueType.AES_CCM
VT_TPM_ENCODED = ValueType.TPM_ENCODED
VT_VALIDATION = ValueType.VALIDATION
VT_VMK = ValueType.VMK
VT_EXTERNAL_KEY = ValueType.EXTERNAL_KEY
VT_UPDATE = ValueType.UPDATE
VT_ERROR = ValueType.ERROR
VT_OFFSET_SIZE = ValueType.OFFSET_SIZE

#: Fixed part of each value type (incl. the 8-byte entry header); nested entries follow it.
VALUE_HEADER_SIZE: dict[int, int] = {
    VT_ERASED: 8,
    VT_KEY: 0x0C,
    VT_UNICODE: 8,
    VT_STRETCH_KEY: 0x1C,
    VT_USE_KEY: 0x0C,
    VT_AES_CCM: 0x24,
    VT_TPM_ENCODED: 0x0C,
    VT_VALIDATION: 8,
    VT_VMK: 0x24,
    VT_EXTERNAL_KEY: 0x20,
    VT_UPDATE: 0x2C,
    VT_ERROR: 0x34,
    VT_OFFSET_SIZE: 0x18,
}
#: Value types whose payload continues with nested entries after the fixed part.
NESTING_TYPES = frozenset({VT_STRETCH_KEY, VT_USE_KEY, VT_VMK, VT_EXTERNAL_KEY})


# --- protection types (VMK payload) ---------------------------------------------------------
class Protection(IntEnum):
    """Key protector type (VMK payload ``protection``)."""

    CLEAR_KEY = 0x0000
    TPM = 0x0100
    STARTUP_KEY = 0x0200
    TPM_PIN = 0x0500
    RECOVERY_PASSWORD = 0x0800
    SMART_CARD = 0x1000
    PASSWORD = 0x2000


PROT_CLEAR_KEY = Protection.CLEAR_KEY
PROT_TPM = Protection.TPM
PROT_STARTUP_KEY = Protection.STARTUP_KEY
PROT_TPM_PIN = Protection.TPM_PIN
PROT_RECOVERY_PASSWORD = Protection.RECOVERY_PASSWORD
PROT_SMART_CARD = Protection.SMART_CARD
PROT_PASSWORD = Protection.PASSWORD

PROTECTION_NAMES: dict[int, str] = {
    PROT_CLEAR_KEY: "clear-key",
    PROT_TPM: "tpm",
    PROT_STARTUP_KEY: "startup-key",
    PROT_TPM_PIN: "tpm-pin",
    PROT_RECOVERY_PASSWORD: "recovery-password",
    PROT_SMART_CARD: "smart-card",
    PROT_PASSWORD: "password",
}


# --- key types in KEY / STRETCH_KEY / USE_KEY payloads --------------------------------------
class KeyType(IntEnum):
    """Key type in KEY / STRETCH_KEY / USE_KEY payloads (FVEK keys use :class:`Method`)."""

    RECOVERY_STRETCH = 0x1000
    PASSWORD_STRETCH = 0x1001
    CLEAR = 0x2000
    EXTERNAL = 0x2002
    VMK = 0x2003
    VALIDATION_HASH = 0x2005


KEYTYPE_RECOVERY_STRETCH = KeyType.RECOVERY_STRETCH
KEYTYPE_PASSWORD_STRETCH = KeyType.PASSWORD_STRETCH
KEYTYPE_CLEAR = KeyType.CLEAR
KEYTYPE_EXTERNAL = KeyType.EXTERNAL
KEYTYPE_VMK = KeyType.VMK
KEYTYPE_VALIDATION_HASH = KeyType.VALIDATION_HASH


# --- metadata states ------------------------------------------------------------------------
class State(IntEnum):
    """Conversion state in the metadata block header."""

    DECRYPTED = 1
    SWITCHING = 2
    PAUSED = 3
    ENCRYPTED = 4
    SWITCHING_5 = 5


STATE_NAMES: dict[int, str] = {
    State.DECRYPTED: "decrypted",
    State.SWITCHING: "switching",
    State.PAUSED: "paused",
    State.ENCRYPTED: "encrypted",
    State.SWITCHING_5: "switching",
}
STATE_ENCRYPTED = State.ENCRYPTED

# ==== structures ============================================================================


def build(st: Construct, obj: dict[str, Any]) -> bytes:
    """``st.build(obj)``, typed (construct is untyped)."""
    out: bytes = st.build(obj)
    return out


#: The FAT32-style BPB both volume-header layouts start with (offsets 0x000..0x05A).
_BPB = (
    "jump" / Bytes(3),
    "signature" / Bytes(8),
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,
    "reserved_sectors" / Int16ul,
    "fat_count" / Int8ul,
    "root_entries" / Int16ul,
    "total_sectors_16" / Int16ul,
    "media" / Int8ul,
    "sectors_per_fat_16" / Int16ul,
    "sectors_per_track" / Int16ul,
    "heads" / Int16ul,
    "hidden_sectors" / Int32ul,
    "total_sectors_32" / Int32ul,
    "sectors_per_fat_32" / Int32ul,
    "fat_flags" / Int16ul,
    "fs_version" / Int16ul,
    "root_cluster" / Int32ul,
    "fsinfo_sector" / Int16ul,
    "backup_boot_sector" / Int16ul,
    "reserved1" / Bytes(4),
    "vista_metadata_lcn" / Int64ul,  # 0x038: must be 0 for Windows 7+ (dislocker)
    "drive_number" / Int8ul,
    "reserved2" / Int8ul,
    "ext_boot_signature" / Int8ul,
    "volume_serial" / Int32ul,
    "volume_label" / Bytes(11),
    "fs_type" / Bytes(8),
)

#: FVE volume header (sector 0), Windows 7+ fixed-disk layout: ``-FVE-FS-``, GUID at 0xA0.
BootSector = Struct(
    *_BPB,
    "boot_code" / Bytes(70),
    "identifier" / Bytes(16),  # 0x0A0
    "metadata_offsets" / Array(3, Int64ul),  # 0x0B0
    "eow_offsets" / Array(2, Int64ul),  # 0x0C8
    "boot_code2" / Bytes(0x1FE - 0xD8),
    "end_signature" / Bytes(2),
)
assert BootSector.sizeof() == 512

#: BitLocker To Go volume header (sector 0; removable-media layout, Windows 7+): OEM
#: ``MSWIN4.1``, the BitLocker GUID at 0x1A8 and the three metadata offsets at 0x1B8.
ToGoBootSector = Struct(
    *_BPB,
    "boot_code" / Bytes(0x1A8 - 0x5A),
    "identifier" / Bytes(16),  # 0x1A8
    "metadata_offsets" / Array(3, Int64ul),  # 0x1B8
    "boot_code2" / Bytes(0x1FE - 0x1D0),
    "end_signature" / Bytes(2),
)
assert ToGoBootSector.sizeof() == 512

#: FVE metadata block header ("FVE_INFORMATION"), version 2; 64 bytes.
BlockHeader = Struct(
    "signature" / Bytes(8),
    "header_size" / Int16ul,  # version 2: size of block header + dataset in 16-byte units
    "version" / Int16ul,
    "current_state" / Int16ul,
    "next_state" / Int16ul,
    "encrypted_size" / Int64ul,  # StateOffset: bytes >= this are plaintext
    "convert_size" / Int32ul,
    "virtualized_sectors" / Int32ul,  # number of relocated header sectors
    "metadata_offsets" / Array(3, Int64ul),
    "vho_offset" / Int64ul,  # VirtualizedBlockOffset
)
assert BlockHeader.sizeof() == 64

#: Dataset header ("FVE_DATASET"), 48 bytes at block offset 0x40.
DatasetHeader = Struct(
    "size" / Int32ul,
    "version" / Int32ul,
    "header_size" / Int32ul,
    "size_copy" / Int32ul,
    "volume_guid" / Bytes(16),
    "nonce_counter" / Int32ul,
    "method" / Int16ul,
    "method_copy" / Int16ul,
    "created" / Int64ul,
)
assert DatasetHeader.sizeof() == 48
DATASET_HEADER_SIZE = 48
BLOCK_HEADER_SIZE = 64

#: Entry ("datum") header, used at every nesting level.
EntryHeader = Struct(
    "size" / Int16ul,
    "role" / Int16ul,
    "vtype" / Int16ul,
    "version" / Int16ul,
)
ENTRY_HEADER_SIZE = 8

#: Validation header right after ``header_size * 16`` bytes of the block.
ValidationHeader = Struct(
    "size" / Int16ul,
    "version" / Int16ul,
    "crc32" / Int32ul,
)
VALIDATION_HEADER_SIZE = 8

# Payloads (bytes after the 8-byte entry header).
KeyPayload = Struct("key_type" / Int16ul, "flags" / Int16ul, "key" / GreedyBytes)
StretchKeyPayload = Struct("key_type" / Int16ul, "flags" / Int16ul, "salt" / Bytes(16), "nested" / GreedyBytes)
UseKeyPayload = Struct("key_type" / Int16ul, "flags" / Int16ul, "nested" / GreedyBytes)
AesCcmPayload = Struct("nonce_time" / Int64ul, "nonce_counter" / Int32ul, "tag" / Bytes(16), "ciphertext" / GreedyBytes)
TpmEncodedPayload = Struct("pcr_bitmap" / Int32ul, "blob" / GreedyBytes)
VmkPayload = Struct(
    "guid" / Bytes(16), "modified" / Int64ul, "unknown" / Int16ul, "protection" / Int16ul, "nested" / GreedyBytes
)
ExternalKeyPayload = Struct("guid" / Bytes(16), "modified" / Int64ul, "nested" / GreedyBytes)
OffsetSizePayload = Struct("offset" / Int64ul, "size" / Int64ul, "extra" / GreedyBytes)
