"""LUKS2 key derivation: PBKDF2 (keyslots and digests) and Argon2i/Argon2id (keyslots).

Both come from ``cryptography`` (OpenSSL); Argon2 is version 0x13 with ``lanes = cpus`` and
``memory`` in KiB, as the LUKS2 spec's ``kdf`` object states them.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2i, Argon2id
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from ..errors import FormatError, UnsupportedError

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha512": hashes.SHA512}
SALT_LEN = 32


def b64decode(v: object, what: str) -> bytes:
    """A base64 JSON field (FormatError when it is not)."""
    if not isinstance(v, str):
        raise FormatError(f"LUKS2 {what} is not a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"LUKS2 {what} is not valid base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC-``hash_name``."""
    alg = _HASHES.get(hash_name)
    if alg is None:
        raise UnsupportedError(f"PBKDF2 hash {hash_name!r} is not supported", hint=", ".join(_HASHES))
    if not 1 <= iterations <= 1 << 32:
        raise FormatError(f"PBKDF2 iterations {iterations} out of range")
    return PBKDF2HMAC(alg(), length, salt, iterations).derive(secret)


@dataclass(frozen=True)
class KdfParams:
    """A keyslot KDF to create: ``argon2id`` (time = passes, memory KiB, cpus = lanes) or
    ``pbkdf2`` (hash, iterations)."""

    type: str = "argon2id"
    time: int = 4
    memory: int = 262144
    cpus: int = 2
    hash: str = "sha256"
    iterations: int = 600_000

    def to_json(self, salt: bytes) -> dict[str, Any]:
        if self.type == "pbkdf2":
            return {"type": "pbkdf2", "hash": self.hash, "iterations": self.iterations, "salt": b64(salt)}
        if self.type in ("argon2id", "argon2i"):
            return {"type": self.type, "time": self.time, "memory": self.memory, "cpus": self.cpus, "salt": b64(salt)}
        raise UnsupportedError(f"keyslot KDF {self.type!r} is not supported", hint="pbkdf2 or argon2id")


def new_kdf_json(params: KdfParams) -> dict[str, Any]:
    """The ``kdf`` object of a new keyslot, with a fresh salt."""
    return params.to_json(os.urandom(SALT_LEN))


def derive(kdf: dict[str, Any], passphrase: bytes, length: int) -> bytes:
    """Run a keyslot's ``kdf`` object over ``passphrase``."""
    if not isinstance(kdf, dict):
        raise FormatError("LUKS2 keyslot has no kdf object")
    salt = b64decode(kdf.get("salt"), "kdf salt")
    t = kdf.get("type")
    if t == "pbkdf2":
        it = kdf.get("iterations")
        if not isinstance(it, int):
            raise FormatError("LUKS2 pbkdf2 iterations is not a number")
        return pbkdf2(str(kdf.get("hash")), passphrase, salt, it, length)
    if t in ("argon2id", "argon2i"):
        tm, mem, cpus = kdf.get("time"), kdf.get("memory"), kdf.get("cpus")
        if not all(isinstance(x, int) and x > 0 for x in (tm, mem, cpus)):
            raise FormatError("LUKS2 argon2 time/memory/cpus are not positive numbers")
        assert isinstance(tm, int) and isinstance(mem, int) and isinstance(cpus, int)
        if mem > 4 << 20:  # cryptsetup's own ceiling is 4 GiB
            raise UnsupportedError(f"argon2 memory {mem} KiB is more than 4 GiB")
        cls = Argon2id if t == "argon2id" else Argon2i
        try:
            return cls(salt=salt, length=length, iterations=tm, lanes=cpus, memory_cost=mem).derive(passphrase)
        except ValueError as e:
            raise FormatError(f"LUKS2 argon2 parameters refused: {e}") from None
    raise UnsupportedError(f"keyslot KDF {t!r} is not supported", hint="pbkdf2, argon2i or argon2id")
