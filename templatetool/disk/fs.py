"""Filesystem sniffing from the first sectors of a volume."""

from __future__ import annotations

from ..blockdev import BlockDevice

FS_NTFS = "ntfs"
FS_FAT32 = "fat32"
FS_FAT = "fat"
FS_EXFAT = "exfat"
FS_EXT = "ext"
FS_BITLOCKER = "bitlocker"
FS_BITLOCKER_TOGO = "bitlocker-to-go"


def sniff_filesystem(view: BlockDevice) -> str | None:
    """Return 'ntfs', 'fat32', 'fat', 'exfat', 'ext', 'bitlocker', 'bitlocker-to-go' or None."""
    if view.size < 2048:
        return None
    head = view.read(0, min(view.size, 4096))
    oem = head[3:11]
    if oem == b"-FVE-FS-":
        return FS_BITLOCKER
    if oem == b"NTFS    ":
        return FS_NTFS
    if oem == b"EXFAT   ":
        return FS_EXFAT
    if oem == b"MSWIN4.1" and head[0x1A8:0x1AC] == b"\x3b\xd6\x67\x49":  # BitLocker GUID where To Go has it
        return FS_BITLOCKER_TOGO
    if head[0x52:0x5A] == b"FAT32   ":
        return FS_FAT32
    if head[0x36:0x3B] in (b"FAT12", b"FAT16", b"FAT  "):
        return FS_FAT
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return FS_EXT
    return None
