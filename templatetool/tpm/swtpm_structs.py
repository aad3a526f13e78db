"""swtpm's state-blob layout (``tpm2-00.permall`` and the other state files), declared with
``construct``. Spec and measured quirks: docs/formats/vtpm-state.md. No logic beyond layout.

All integers are big-endian. A blob is a 10-byte header followed by TLVs (u16 tag, u32 length,
value). swtpm 0.7 writes an encrypted permanent state as the TLVs ciphertext (2), HMAC (3),
IV (6), in that order; an unencrypted one as a single data TLV (1).
"""

from __future__ import annotations

from construct import GreedyBytes, GreedyRange, Int8ub, Int16ub, Int32ub, Prefixed, Struct, Terminated

#: Header version swtpm writes (and the oldest version a reader must understand).
BLOB_VERSION = 2
BLOB_MIN_VERSION = 1
HEADER_SIZE = 10

# header flags
FLAG_ENCRYPTED = 0x01
FLAG_MIGRATION_ENCRYPTED = 0x02
FLAG_MIGRATION_DATA = 0x04
FLAG_ENCRYPTED_256BIT_KEY = 0x08
FLAG_MIGRATION_256BIT_KEY = 0x10

# TLV tags
TAG_DATA = 1
TAG_ENCRYPTED_DATA = 2
TAG_HMAC = 3
TAG_MIGRATION_DATA = 4
TAG_ENCRYPTED_MIGRATION_DATA = 5
TAG_IVEC_ENCRYPTED_DATA = 6
TAG_IVEC_ENCRYPTED_MIGRATION_DATA = 7

BLOB_HEADER = Struct(
    "version" / Int8ub,
    "minVersion" / Int8ub,
    "hdrSize" / Int16ub,  # 10
    "flags" / Int16ub,
    "totalLength" / Int32ub,  # header + all TLVs
)

TLV = Struct(
    "tag" / Int16ub,
    "value" / Prefixed(Int32ub, GreedyBytes),
)

STATE_BLOB = Struct(
    "header" / BLOB_HEADER,
    "tlvs" / GreedyRange(TLV),
    Terminated,
)
