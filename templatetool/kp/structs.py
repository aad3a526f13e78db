"""Binary structures of the key protector ([MS-KPS] §2.2.3.10 Payload_V1), declared with construct.

Payload_V1 (little-endian)::

    DataSize      u32   total size of this structure in bytes (16 + NumberOfKeys * KeyLength)
    Version       u32   1
    NumberOfKeys  u32   number of keys that follow (we write 1)
    KeyLength     u32   length of each key in bytes
    KeyValue      NumberOfKeys * KeyLength bytes
"""

from __future__ import annotations

from construct import Array, Bytes, Const, Int32ul, Struct, this

PAYLOAD_HEADER_SIZE = 16

PayloadV1 = Struct(
    "DataSize" / Int32ul,
    "Version" / Const(1, Int32ul),
    "NumberOfKeys" / Int32ul,
    "KeyLength" / Int32ul,
    "KeyValue" / Array(this.NumberOfKeys, Bytes(this.KeyLength)),
)
