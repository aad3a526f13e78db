"""FVE metadata: build and parse the volume header (boot sector), the metadata blocks and entries.

A metadata block is ``block header (64) || dataset (48 + entries) || zero pad to 16 ||
validation (8 + AES-CCM entry)``. The CRC-32 covers the first ``header_size * 16`` bytes; the
AES-CCM validation entry holds SHA-256 of the same bytes, encrypted with the VMK.
Parsing checks every rule any of the three readers (libbde, dislocker, dissect.fve) checks and
raises FormatError/IntegrityError naming the field and the copy.
"""

from __future__ import annotations

import binascii
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError

from ..errors import FormatError, IntegrityError, UnsupportedError
from . import structs as S

# ---- entries -----------------------------------------------------------------------------------


@dataclass
class Entry:
    """One metadata entry ("datum"): role, value type, version and the payload after the header."""

    role: int
    vtype: int
    payload: bytes
    version: int = 1
    where: str = ""

    def build(self) -> bytes:
        size = S.ENTRY_HEADER_SIZE + len(self.payload)
        if size > 0xFFFF:
            raise FormatError("metadata entry too large", self.where)
        return (
            S.build(S.EntryHeader, {"size": size, "role": self.role, "vtype": self.vtype, "version": self.version})
            + self.payload
        )

    def children(self) -> list[Entry]:
        """Nested entries of VMK / STRETCH_KEY / USE_KEY / EXTERNAL_KEY values ([] otherwise)."""
        if self.vtype not in S.NESTING_TYPES:
            return []
        start = S.VALUE_HEADER_SIZE[self.vtype] - S.ENTRY_HEADER_SIZE
        if len(self.payload) < start:
            raise FormatError(f"entry of type {self.vtype:#06x} shorter than its fixed part", self.where)
        return list(iter_entries(self.payload, start, len(self.payload), self.where + "/nested"))

    def child(self, vtype: int, role: int | None = None) -> Entry | None:
        """First direct child of the given value type (and role)."""
        for c in self.children():
            if c.vtype == vtype and (role is None or c.role == role):
                return c
        return None


def make_entry(role: int, vtype: int, fixed: bytes, nested: list[Entry] | None = None) -> Entry:
    """Build an Entry from its fixed payload part and nested entries."""
    payload = fixed + b"".join(e.build() for e in (nested or []))
    return Entry(role, vtype, payload)


def unicode_entry(text: str, role: int = S.ROLE_PROPERTY) -> Entry:
    """A UNICODE entry (UTF-16LE with terminating NUL)."""
    return Entry(role, S.VT_UNICODE, (text + "\0").encode("utf-16-le"))


def iter_entries(buf: bytes, start: int, end: int, where: str) -> Iterator[Entry]:
    """Entries packed back to back in ``buf[start:end]``; a zero header ends the list."""
    pos = start
    while pos < end:
        if end - pos < S.ENTRY_HEADER_SIZE:
            raise FormatError(f"truncated metadata entry header at +{pos:#x}", where)
        h = S.EntryHeader.parse(buf[pos : pos + 8])
        if h.size == 0 and h.role == 0 and h.vtype == 0:
            return
        if h.size < S.ENTRY_HEADER_SIZE or pos + h.size > end:
            raise FormatError(
                f"metadata entry at +{pos:#x} has size {h.size} beyond its container (ends at +{end:#x})", where
            )
        fixed = S.VALUE_HEADER_SIZE.get(h.vtype)
        if fixed is not None and h.size < fixed:
            raise FormatError(
                f"metadata entry at +{pos:#x} of type {h.vtype:#06x} is truncated ({h.size} < {fixed} bytes)", where
            )
        yield Entry(h.role, h.vtype, bytes(buf[pos + 8 : pos + h.size]), h.version, f"{where}+{pos:#x}")
        pos += h.size


def unicode_text(e: Entry) -> str:
    """Decode a UNICODE entry."""
    return e.payload.decode("utf-16-le", errors="replace").rstrip("\0")


# ---- boot sector -------------------------------------------------------------------------------


@dataclass
class BootInfo:
    """What the FVE volume header tells: sector size, the three metadata offsets and the layout
    (``standard``: ``-FVE-FS-`` fixed-disk header; ``to-go``: the removable-media header)."""

    sector_size: int
    metadata_offsets: tuple[int, int, int]
    total_sectors: int
    identifier: uuid.UUID
    hidden_sectors: int = 0
    layout: str = S.LAYOUT_STANDARD


_BITLOCKER_MSG = b"\r\nThis volume is protected by BitLocker Drive Encryption; unlock it to read.\r\n"


def build_boot_sector(
    sector_size: int,
    metadata_offsets: tuple[int, int, int],
    *,
    total_sectors: int = 0,
    hidden_sectors: int = 0,
    sectors_per_cluster: int = 8,
    layout: str = S.LAYOUT_STANDARD,
) -> bytes:
    """The 512-byte volume header Windows 7+ writes.

    ``standard``: ``EB 58 90 -FVE-FS-``, BitLocker GUID at 0xA0, metadata offsets at 0xB0.
    ``to-go``: ``EB 58 90 MSWIN4.1``, GUID at 0x1A8, offsets at 0x1B8 (the total-sector count
    is always set: libbde sizes a To Go volume from it). In both the BPB has no FATs and no
    reserved sectors, as in Windows' ``-FVE-FS-`` header, so no FAT driver mounts the raw
    volume (templatetool does not write the To Go discovery volume's reader files).
    """
    if layout not in S.IDENTIFIER_OFFSET:
        raise FormatError(f"unknown BitLocker volume layout {layout!r}")
    to_go = layout == S.LAYOUT_TO_GO
    fields = {
        "jump": S.BOOT_JUMP,
        "signature": S.TO_GO_SIGNATURE if to_go else S.FVE_SIGNATURE,
        "bytes_per_sector": sector_size,
        "sectors_per_cluster": sectors_per_cluster,
        "reserved_sectors": 0,
        "fat_count": 0,
        "root_entries": 0,
        "total_sectors_16": 0,
        "media": 0xF8,
        "sectors_per_fat_16": 0,
        "sectors_per_track": 0x3F,
        "heads": 0xFF,
        "hidden_sectors": hidden_sectors & 0xFFFFFFFF,
        "total_sectors_32": total_sectors if total_sectors < 1 << 32 else 0,
        "sectors_per_fat_32": 0x1FE0,
        "fat_flags": 0,
        "fs_version": 0,
        "root_cluster": 0,
        "fsinfo_sector": 1,
        "backup_boot_sector": 6,
        "reserved1": bytes(4),
        "vista_metadata_lcn": 0,
        "drive_number": 0x80,
        "reserved2": 0,
        "ext_boot_signature": 0x29,
        "volume_serial": 0,
        "volume_label": b"NO NAME    ",
        "fs_type": b"FAT32   ",
        "identifier": S.BITLOCKER_GUID.bytes_le,
        "metadata_offsets": list(metadata_offsets),
        "end_signature": b"\x55\xaa",
    }
    if to_go:
        return S.build(
            S.ToGoBootSector,
            dict(fields, boot_code=_BITLOCKER_MSG.ljust(0x1A8 - 0x5A, b"\0"), boot_code2=bytes(0x1FE - 0x1D0)),
        )
    return S.build(
        S.BootSector,
        dict(fields, boot_code=bytes(70), eow_offsets=[0, 0], boot_code2=_BITLOCKER_MSG.ljust(0x1FE - 0xD8, b"\0")),
    )


def volume_layout(sector: bytes) -> str | None:
    """``standard``/``to-go`` when ``sector`` (sector 0) is a BitLocker volume header, else None.

    A ``MSWIN4.1`` (FAT) boot sector counts as To Go only with the BitLocker GUID at 0x1A8.
    """
    if len(sector) < 512:
        return None
    if sector[3:11] == S.FVE_SIGNATURE:
        return S.LAYOUT_STANDARD
    if sector[3:11] == S.TO_GO_SIGNATURE and sector[0x1A8:0x1B8] in (
        S.BITLOCKER_GUID.bytes_le,
        S.BITLOCKER_EOW_GUID.bytes_le,
    ):
        return S.LAYOUT_TO_GO
    return None


def parse_boot_sector(sector: bytes, volume_size: int, where: str = "FVE volume header") -> BootInfo:
    """Parse and validate sector 0 of a BitLocker volume (fixed-disk or To Go layout)."""
    if len(sector) < 512:
        raise FormatError("volume too small for a BitLocker header", where)
    sig = sector[3:11]
    if sig == S.TO_GO_SIGNATURE:
        return _parse_to_go(sector[:512], volume_size, where)
    b = S.BootSector.parse(sector[:512])
    if b.signature != S.FVE_SIGNATURE:
        raise FormatError("not a BitLocker volume (no -FVE-FS- signature)", where)
    if b.jump == S.BOOT_JUMP_VISTA or b.vista_metadata_lcn != 0:
        raise UnsupportedError("Windows Vista BitLocker volume", where, "only Windows 7+ volumes are supported")
    if b.jump != S.BOOT_JUMP:
        raise FormatError(f"bad boot-sector jump bytes {b.jump.hex()} (expected eb5890)", where)
    ident = uuid.UUID(bytes_le=b.identifier)
    if ident == S.BITLOCKER_EOW_GUID:
        raise UnsupportedError("used-space-only (EOW) BitLocker volume", where)
    if ident != S.BITLOCKER_GUID:
        raise FormatError(f"unknown BitLocker identifier {ident}", f"{where} offset 0xA0")
    return _boot_info(b, volume_size, where, S.LAYOUT_STANDARD, 0xB0)


def _parse_to_go(sector: bytes, volume_size: int, where: str) -> BootInfo:
    b = S.ToGoBootSector.parse(sector)
    ident = uuid.UUID(bytes_le=b.identifier)
    if ident == S.BITLOCKER_EOW_GUID:
        raise UnsupportedError("used-space-only (EOW) BitLocker To Go volume", where)
    if ident != S.BITLOCKER_GUID:
        at = sector.find(S.BITLOCKER_GUID.bytes_le)
        if at >= 0:  # a BitLocker identifier, but not where Windows 7+ To Go puts it
            raise UnsupportedError(
                f"BitLocker To Go header variant with the identifier at offset {at:#x} (Windows 7+ puts it at 0x1A8)",
                where,
            )
        raise FormatError("not a BitLocker volume (a FAT boot sector without the BitLocker identifier)", where)
    if b.jump != S.BOOT_JUMP:
        raise FormatError(f"bad boot-sector jump bytes {b.jump.hex()} (expected eb5890)", where)
    if b.vista_metadata_lcn != 0:
        raise FormatError(
            "BitLocker To Go header has a non-zero value at 0x038 (dislocker would read it as Vista)",
            f"{where} offset 0x38",
        )
    return _boot_info(b, volume_size, where, S.LAYOUT_TO_GO, 0x1B8)


def _boot_info(b: Any, volume_size: int, where: str, layout: str, offsets_at: int) -> BootInfo:
    if b.bytes_per_sector not in (512, 1024, 2048, 4096):
        raise FormatError(f"bytes per sector {b.bytes_per_sector} out of range (512..4096)", f"{where} offset 0x0B")
    if b.end_signature != b"\x55\xaa":
        raise FormatError("boot sector signature 55AA missing", f"{where} offset 0x1FE")
    offs = tuple(int(o) for o in b.metadata_offsets)
    for i, o in enumerate(offs):
        if o == 0 or o % b.bytes_per_sector or o + S.BLOCK_HEADER_SIZE > volume_size:
            raise FormatError(
                f"metadata offset {i + 1} = {o:#x} is outside the volume or misaligned",
                f"{where} offset {offsets_at + 8 * i:#x}",
            )
    total = b.total_sectors_16 or b.total_sectors_32
    return BootInfo(
        b.bytes_per_sector,
        offs,  # type: ignore[arg-type]
        total,
        uuid.UUID(bytes_le=b.identifier),
        b.hidden_sectors,
        layout,
    )


# ---- metadata block ----------------------------------------------------------------------------


@dataclass
class Metadata:
    """One parsed metadata copy."""

    offset: int
    version: int
    current_state: int
    next_state: int
    encrypted_size: int
    virtualized_sectors: int
    metadata_offsets: tuple[int, int, int]
    vho_offset: int
    volume_guid: uuid.UUID
    nonce_counter: int
    method: int
    created: int
    entries: list[Entry]
    covered: bytes  # the header_size*16 bytes covered by CRC and hash
    validation_version: int
    validation_ccm: bytes | None  # AES-CCM payload of the VMK-encrypted hash, if any
    vho_size: int = 0
    crc_ok: bool = True
    errors: list[str] = field(default_factory=list)

    def entries_of(self, role: int, vtype: int | None = None) -> list[Entry]:
        return [e for e in self.entries if e.role == role and (vtype is None or e.vtype == vtype)]

    def sha256(self) -> bytes:
        return hashlib.sha256(self.covered).digest()


def build_metadata_block(
    *,
    encrypted_size: int,
    virtualized_sectors: int,
    metadata_offsets: tuple[int, int, int],
    vho_offset: int,
    volume_guid: uuid.UUID,
    nonce_counter: int,
    method: int,
    created: int,
    entries: list[Entry],
    state: int = S.STATE_ENCRYPTED,
) -> bytes:
    """Return the block header + dataset + zero pad (the bytes the CRC and hash cover).

    :func:`finish_metadata_block` appends the validation structure."""
    body = b"".join(e.build() for e in entries)
    ds_size = S.DATASET_HEADER_SIZE + len(body)
    ds = (
        S.build(
            S.DatasetHeader,
            {
                "size": ds_size,
                "version": 1,
                "header_size": S.DATASET_HEADER_SIZE,
                "size_copy": ds_size,
                "volume_guid": volume_guid.bytes_le,
                "nonce_counter": nonce_counter,
                "method": method,
                "method_copy": 0,
                "created": created,
            },
        )
        + body
    )
    header_units = -(-(S.BLOCK_HEADER_SIZE + ds_size) // 16)
    hdr = S.build(
        S.BlockHeader,
        {
            "signature": S.FVE_SIGNATURE,
            "header_size": header_units,
            "version": 2,
            "current_state": state,
            "next_state": state,
            "encrypted_size": encrypted_size,
            "convert_size": 0,
            "virtualized_sectors": virtualized_sectors,
            "metadata_offsets": list(metadata_offsets),
            "vho_offset": vho_offset,
        },
    )
    return (hdr + ds).ljust(header_units * 16, b"\0")


def finish_metadata_block(covered: bytes, validation_ccm: bytes | None) -> bytes:
    """Append the validation structure (CRC-32 and the VMK-encrypted SHA-256 entry)."""
    crc = binascii.crc32(covered) & 0xFFFFFFFF
    version = 2 if validation_ccm is not None else 1
    v = S.build(S.ValidationHeader, {"size": (0x10000 - len(covered)) & 0xFFFF, "version": version, "crc32": crc})
    if validation_ccm is not None:
        v += Entry(S.ROLE_PROPERTY, S.VT_AES_CCM, validation_ccm).build()
    block = covered + v
    if len(block) > S.METADATA_REGION_SIZE:
        raise FormatError("FVE metadata does not fit its 64 KiB region")
    return block


def parse_metadata_block(data: bytes, offset: int, volume_size: int, copy: int) -> Metadata:
    """Parse and validate one metadata copy (``data`` = its 64 KiB region)."""
    where = f"FVE metadata copy {copy} at {offset:#x}"
    if len(data) < S.BLOCK_HEADER_SIZE + S.DATASET_HEADER_SIZE:
        raise FormatError("metadata block truncated", where)
    try:
        h = S.BlockHeader.parse(data[:64])
    except ConstructError as e:
        raise FormatError(f"unreadable metadata block header: {e}", where) from None
    if h.signature != S.FVE_SIGNATURE:
        raise FormatError("metadata block signature is not -FVE-FS-", where)
    if h.version != 2:
        raise UnsupportedError(f"metadata block version {h.version} (only version 2, Windows 7+)", where)
    covered_len = h.header_size * 16
    if covered_len < 64 + 48 or covered_len + S.VALIDATION_HEADER_SIZE > len(data):
        raise FormatError(f"metadata header size {h.header_size} (x16 bytes) out of range", where)
    covered = bytes(data[:covered_len])
    v = S.ValidationHeader.parse(data[covered_len : covered_len + 8])
    crc = binascii.crc32(covered) & 0xFFFFFFFF
    if crc != v.crc32:
        raise IntegrityError(f"metadata CRC-32 mismatch (stored {v.crc32:#010x}, computed {crc:#010x})", where)
    if h.current_state not in S.STATE_NAMES:
        raise FormatError(f"unknown volume state {h.current_state}", where)
    if h.encrypted_size == 0 or h.encrypted_size > volume_size * 4 + (1 << 40):
        # Readers accept a size larger than a truncated image; reject only absurd values.
        raise FormatError(f"encrypted volume size {h.encrypted_size:#x} out of range", where)
    if h.virtualized_sectors == 0 or h.virtualized_sectors > 4096:
        raise FormatError(f"relocated header sector count {h.virtualized_sectors} out of range", where)
    offs = tuple(int(o) for o in h.metadata_offsets)
    ds = S.DatasetHeader.parse(covered[64:112])
    if ds.version != 1 or ds.header_size != S.DATASET_HEADER_SIZE:
        raise FormatError(f"dataset version {ds.version} / header size {ds.header_size:#x} (expected 1 / 0x30)", where)
    if ds.size != ds.size_copy:
        raise FormatError(f"dataset size {ds.size:#x} differs from its copy {ds.size_copy:#x}", where)
    if ds.size < S.DATASET_HEADER_SIZE or 64 + ds.size > covered_len:
        raise FormatError(f"dataset size {ds.size:#x} exceeds the metadata header size", where)
    if ds.method not in S.METHOD_NAMES:
        raise UnsupportedError(f"unknown encryption method {ds.method:#06x}", where)
    dsbuf = covered[64 : 64 + ds.size]
    entries = list(iter_entries(dsbuf, S.DATASET_HEADER_SIZE, ds.size, where))
    vccm: bytes | None = None
    if v.version >= 2:
        rest = data[covered_len + 8 :]
        ents = list(iter_entries(rest, 0, min(len(rest), 0x100), where + " validation")) if len(rest) >= 8 else []
        ents = [e for e in ents if e.vtype == S.VT_AES_CCM]
        if not ents:
            raise FormatError("validation version 2 without its AES-CCM entry", where)
        vccm = ents[0].payload
    m = Metadata(
        offset=offset,
        version=h.version,
        current_state=h.current_state,
        next_state=h.next_state,
        encrypted_size=h.encrypted_size,
        virtualized_sectors=h.virtualized_sectors,
        metadata_offsets=offs,  # type: ignore[arg-type]
        vho_offset=h.vho_offset,
        volume_guid=uuid.UUID(bytes_le=ds.volume_guid),
        nonce_counter=ds.nonce_counter,
        method=ds.method,
        created=ds.created,
        entries=entries,
        covered=covered,
        validation_version=v.version,
        validation_ccm=vccm,
    )
    vhb = m.entries_of(S.ROLE_VOLUME_HEADER_BLOCK, S.VT_OFFSET_SIZE)
    if vhb:
        os_ = S.OffsetSizePayload.parse(vhb[0].payload)
        if os_.offset != h.vho_offset:
            raise FormatError(
                f"volume header block entry offset {os_.offset:#x} differs from the block header's {h.vho_offset:#x}",
                where,
            )
        m.vho_size = os_.size
    if h.vho_offset % 512 or h.vho_offset + max(m.vho_size, 512) > max(volume_size, h.encrypted_size):
        raise FormatError(f"relocated header offset {h.vho_offset:#x} outside the volume", where)
    if not m.entries_of(S.ROLE_FVEK, S.VT_AES_CCM):
        raise FormatError("no FVEK entry in the metadata", where)
    if not m.entries_of(S.ROLE_VMK, S.VT_VMK):
        raise FormatError("no key protector (VMK entry) in the metadata", where)
    for vmk in m.entries_of(S.ROLE_VMK, S.VT_VMK):
        vmk.children()  # validates nesting
    return m
