"""The LUKS anti-forensic information splitter (AF-split / AF-merge).

Written here from the description in the LUKS1 On-Disk Format Specification (section 2.4) and
Fruhwirth's TKS1 paper; no code was taken from cryptsetup. A key of ``n`` bytes is stored as
``stripes`` blocks of ``n`` bytes: blocks 0..stripes-2 are random, and the last block is the key
XOR the running "diffused" accumulator ``d``, where ``d_0 = 0`` and ``d_{i+1} = H(d_i XOR s_i)``.
Destroying any one stripe destroys the key.

``H`` (diffuse) hashes the block in digest-sized pieces: piece ``j`` becomes
``hash(be32(j) || piece_j)``, the last (short) piece truncated to its own length.
"""

from __future__ import annotations

import hashlib
import os

from ..errors import FormatError, UnsupportedError

#: Hash names LUKS headers use (``af.hash``, ``kdf.hash``) that we accept.
HASHES = ("sha1", "sha256", "sha512")


def _check_hash(name: str) -> None:
    if name not in HASHES:
        raise UnsupportedError(f"AF hash {name!r} is not supported", hint=f"one of {', '.join(HASHES)}")


def diffuse(block: bytes, hash_name: str) -> bytes:
    """The AF diffusion function ``H`` over one block."""
    _check_hash(hash_name)
    ds = hashlib.new(hash_name).digest_size
    out = bytearray()
    for j in range((len(block) + ds - 1) // ds):
        piece = block[j * ds : (j + 1) * ds]
        out += hashlib.new(hash_name, j.to_bytes(4, "big") + piece).digest()[: len(piece)]
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_split(key: bytes, stripes: int, hash_name: str, rand: bytes | None = None) -> bytes:
    """Split ``key`` into ``stripes * len(key)`` bytes.

    ``rand`` (tests only) supplies the ``(stripes - 1) * len(key)`` random bytes; by default they
    come from ``os.urandom``.
    """
    if stripes < 1:
        raise FormatError(f"AF stripes must be at least 1, got {stripes}")
    n = len(key)
    if rand is None:
        rand = os.urandom((stripes - 1) * n)
    if len(rand) != (stripes - 1) * n:
        raise ValueError("rand has the wrong length")
    d = bytes(n)
    for i in range(stripes - 1):
        d = diffuse(_xor(d, rand[i * n : (i + 1) * n]), hash_name)
    return rand + _xor(d, key)


def af_merge(material: bytes | bytearray | memoryview, key_size: int, stripes: int, hash_name: str) -> bytes:
    """Recover the ``key_size``-byte key from the first ``stripes * key_size`` bytes of ``material``."""
    if stripes < 1 or key_size < 1 or len(material) < stripes * key_size:
        raise FormatError(f"AF material of {len(material)} bytes is shorter than {stripes} x {key_size}")
    m = bytes(material[: stripes * key_size])
    d = bytes(key_size)
    for i in range(stripes - 1):
        d = diffuse(_xor(d, m[i * key_size : (i + 1) * key_size]), hash_name)
    return _xor(d, m[(stripes - 1) * key_size : stripes * key_size])
