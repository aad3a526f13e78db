"""templatetool.vhdx: read, write, convert and check VHDX ([MS-VHDX] v2) virtual disks.

Public API::

    open_vhdx(path, writable=False, parent_search=None) -> VhdxDisk
    create_vhdx(path, size, subformat="dynamic", block_size=None, logical_sector_size=512,
                physical_sector_size=4096, parent=None) -> VhdxDisk
    convert(src, dst_path, to="vhdx", subformat="dynamic", block_size=None, progress=True) -> dict
    check(path) -> list[Finding];  cross_check(path) -> list[Finding]
    replay_log(src, dst) -> dict  (a copy with the log replayed)
    is_vhdx(path) -> bool;  open_image(path) -> BlockDevice (raw or VHDX by signature)

See docs/vhdx.md for what is supported and what is refused.
"""

from .check import check, cross_check
from .convert import convert, open_image
from .disk import VhdxDisk, open_vhdx
from .layout import Finding
from .log import replay_log
from .writer import DEFAULT_BLOCK_SIZE, create_vhdx, is_vhdx

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "Finding",
    "VhdxDisk",
    "check",
    "convert",
    "create_vhdx",
    "cross_check",
    "is_vhdx",
    "open_image",
    "open_vhdx",
    "replay_log",
]
