"""LUKS2 binary header (the 4096-byte ``luks2_hdr_disk``), declared with construct.

Layout from the LUKS2 On-Disk Format Specification (version 1.1.x), section 2: all integers are
big-endian; the header is followed by the JSON area, and the pair (binary header + JSON area,
``hdr_size`` bytes in all) is stored twice, the second copy at offset ``hdr_size``. The checksum
is ``checksum_alg`` over the whole ``hdr_size`` bytes with the ``csum`` field zeroed.
"""

from __future__ import annotations

from typing import Any

from construct import Bytes, Const, Int16ub, Int64ub, PaddedString, Padding, Struct

#: Magic of the primary and of the secondary header.
MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
BIN_HDR_SIZE = 4096
#: Allowed ``hdr_size`` values (binary header + JSON area): 16 KiB ... 4 MiB, powers of two.
HDR_SIZES = tuple(1 << n for n in range(14, 23))
#: Offset and length of the ``csum`` field inside the binary header.
CSUM_OFFSET = 448
CSUM_LEN = 64

LuksBinaryHeader = Struct(
    "magic" / Bytes(6),
    "version" / Const(VERSION, Int16ub),
    "hdr_size" / Int64ub,
    "seqid" / Int64ub,
    "label" / PaddedString(48, "ascii"),
    "checksum_alg" / PaddedString(32, "ascii"),
    "salt" / Bytes(64),
    "uuid" / PaddedString(40, "ascii"),
    "subsystem" / PaddedString(48, "ascii"),
    "hdr_offset" / Int64ub,
    Padding(184),
    "csum" / Bytes(CSUM_LEN),
    Padding(7 * 512),
)
assert LuksBinaryHeader.sizeof() == BIN_HDR_SIZE


def build_header(**fields: Any) -> bytes:
    """The 4096 header bytes for ``fields`` (``csum`` defaults to zeros)."""
    fields.setdefault("csum", bytes(CSUM_LEN))
    out: bytes = LuksBinaryHeader.build(fields)
    return out
