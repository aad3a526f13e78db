"""BitLocker key material: recovery passwords, the SHA-256 stretch, AES-CCM wrapping, .BEK files.

* Recovery password: 48 digits in 8 groups of 6; every group is divisible by 11 and below
  720896; the 16-byte recovery key is ``u16le(group // 11)`` for each group.
* Stretch: 0x100000 rounds of SHA-256 over ``last_hash || initial_hash || salt || u64 count``.
  No maintained library implements this BitLocker-specific KDF, so it is written here (one tight
  loop over ``hashlib.sha256``).
* AES-CCM: ``cryptography``'s AESCCM (12-byte nonce, 16-byte tag, no AAD); on disk the payload is
  ``nonce_time(8) || counter(4) || tag(16) || ciphertext``.
* Startup key (.BEK): a 156-byte dataset holding one EXTERNAL_KEY entry.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import struct
import threading
import time
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from ..errors import CredentialError, FormatError, UsageError
from . import structs as S

STRETCH_ROUNDS = 0x100000
_FILETIME_EPOCH_OFFSET = 116444736000000000  # 100-ns ticks between 1601-01-01 and 1970-01-01


# ---- time ------------------------------------------------------------------------------------


def filetime_now() -> int:
    """Current time as a Windows FILETIME (100-ns ticks since 1601-01-01 UTC)."""
    return time.time_ns() // 100 + _FILETIME_EPOCH_OFFSET


def filetime_to_iso(ft: int) -> str | None:
    """FILETIME to an ISO-8601 UTC string (None for 0 or out of range)."""
    if ft <= 0:
        return None
    try:
        secs = (ft - _FILETIME_EPOCH_OFFSET) / 1e7
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))
    except (OverflowError, OSError, ValueError):
        return None


# ---- recovery password ---------------------------------------------------------------------

_GROUP_LIMIT = 65536 * 11


def generate_recovery_password() -> str:
    """A fresh 48-digit recovery password (8 dash-separated groups), from ``secrets``."""
    return "-".join(f"{secrets.randbelow(65536) * 11:06d}" for _ in range(8))


def parse_recovery_password(s: str) -> bytes:
    """Parse a recovery password (with or without dashes/spaces) into the 16-byte recovery key.

    Raises CredentialError naming the first bad group (1-based) — never echoing the password.
    """
    digits = re.sub(r"[\s-]", "", s or "")
    if not re.fullmatch(r"[0-9]{48}", digits):  # ASCII digits only (str.isdigit also accepts '²')
        raise CredentialError(
            "a recovery password has 48 digits in 8 groups of 6",
            hint=f"got {len(digits)} characters after removing dashes",
        )
    out = bytearray()
    for i in range(8):
        g = int(digits[6 * i : 6 * i + 6])
        if g % 11 != 0 or g >= _GROUP_LIMIT:
            raise CredentialError(
                f"recovery password group {i + 1} is not valid", hint="check that group for a typing error"
            )
        out += struct.pack("<H", g // 11)
    return bytes(out)


def format_recovery_key(key16: bytes) -> str:
    """Inverse of :func:`parse_recovery_password`."""
    if len(key16) != 16:
        raise UsageError("a recovery key has 16 bytes")
    return "-".join(f"{v * 11:06d}" for v in struct.unpack("<8H", key16))


def recovery_initial_hash(key16: bytes) -> bytes:
    """Initial hash for the recovery-password stretch: SHA-256 of the 16-byte key."""
    return hashlib.sha256(key16).digest()


def password_initial_hash(password: str) -> bytes:
    """Initial hash for a user password: SHA-256(SHA-256(UTF-16LE password))."""
    return hashlib.sha256(hashlib.sha256(password.encode("utf-16-le")).digest()).digest()


def stretch_key(initial_hash: bytes, salt: bytes, rounds: int = STRETCH_ROUNDS) -> bytes:
    """BitLocker's key stretch (hand-written: no maintained library implements it).

    ``rounds`` iterations of ``h = SHA256(h || initial_hash || salt || u64le(i))`` from h = 0^32.
    """
    if len(initial_hash) != 32 or len(salt) != 16:
        raise UsageError("stretch_key needs a 32-byte hash and a 16-byte salt")
    from ..native import native

    mod = native()
    if mod is not None:  # the same loop in C over OpenSSL's SHA-256: 5x faster
        return bytes(mod.stretch(initial_hash, salt, rounds))
    sha = hashlib.sha256
    tail = initial_hash + salt
    pack = struct.Struct("<Q").pack
    h = bytes(32)
    for i in range(rounds):
        h = sha(h + tail + pack(i)).digest()
    return h


# ---- AES-CCM ---------------------------------------------------------------------------------


class NonceSource:
    """Unique AES-CCM nonces: a FILETIME (unique per process and strictly increasing) + counter."""

    _lock = threading.Lock()
    _last_time = 0

    def __init__(self, start_counter: int = 0) -> None:
        with NonceSource._lock:
            t = max(filetime_now(), NonceSource._last_time + 1)
            NonceSource._last_time = t
        self.time = t
        self.counter = start_counter

    def next(self) -> tuple[int, int]:
        """Return (filetime, counter) and advance the counter."""
        c = self.counter
        self.counter += 1
        return self.time, c


def ccm_wrap(key: bytes, plaintext: bytes, nonce_time: int, nonce_counter: int) -> bytes:
    """AES-CCM encrypt ``plaintext``; return the AES_CCM entry payload (nonce || tag || ct)."""
    nonce = struct.pack("<QI", nonce_time, nonce_counter)
    ct_tag = AESCCM(key, tag_length=16).encrypt(nonce, plaintext, None)
    return nonce + ct_tag[-16:] + ct_tag[:-16]


def ccm_unwrap(key: bytes, payload: bytes, where: str = "AES-CCM entry") -> bytes:
    """Decrypt an AES_CCM payload; CredentialError when the tag does not verify."""
    if len(payload) < 12 + 16:
        raise FormatError("AES-CCM entry too short", where)
    if len(key) not in (16, 24, 32):
        raise FormatError(f"AES-CCM key of {len(key)} bytes", where)
    nonce, tag, ct = payload[:12], payload[12:28], payload[28:]
    try:
        return AESCCM(key, tag_length=16).decrypt(nonce, ct + tag, None)
    except InvalidTag:
        raise CredentialError("the key does not decrypt this entry (wrong credential)", where) from None


def key_entry(key_type: int, key: bytes, role: int = 0, version: int = 1) -> bytes:
    """A KEY entry (header + u16 key type + u16 flags + key), e.g. the 44-byte VMK container."""
    size = S.ENTRY_HEADER_SIZE + 4 + len(key)
    return S.build(S.EntryHeader, {"size": size, "role": role, "vtype": S.VT_KEY, "version": version}) + S.build(
        S.KeyPayload, {"key_type": key_type, "flags": 0, "key": key}
    )


def parse_key_entry(data: bytes, where: str, expect_len: int | None = None) -> tuple[int, bytes]:
    """Parse a decrypted KEY entry; return (key_type, key). Checks size and value type."""
    if len(data) < 12:
        raise FormatError("decrypted key container too short", where)
    h = S.EntryHeader.parse(data)
    if h.vtype != S.VT_KEY or h.size != len(data) or h.size < 12:
        raise FormatError(f"decrypted key container malformed (size {h.size}, type {h.vtype:#x})", where)
    p = S.KeyPayload.parse(data[8 : h.size])
    if expect_len is not None and len(p.key) != expect_len:
        raise FormatError(f"key has {len(p.key)} bytes, expected {expect_len}", where)
    return p.key_type, p.key


# ---- .BEK startup key files ------------------------------------------------------------------

BEK_SIZE = 156


@dataclass(frozen=True)
class StartupKey:
    """A parsed .BEK file: the protector GUID and the 32-byte external key."""

    guid: uuid.UUID
    key: bytes
    created: int = 0

    def __repr__(self) -> str:  # never show key material
        return f"StartupKey(guid={self.guid})"


def build_bek(guid: uuid.UUID, external_key: bytes, created: int | None = None) -> bytes:
    """The 156-byte Windows 7-10 .BEK layout (no Windows 11 role-0x19 entry: dislocker crashes)."""
    if len(external_key) != 32:
        raise UsageError("an external key has 32 bytes")
    ft = filetime_now() if created is None else created
    label = "ExternalKey\0".encode("utf-16-le")
    label_e = S.build(S.EntryHeader, {"size": 8 + len(label), "role": 0, "vtype": S.VT_UNICODE, "version": 1}) + label
    key_e = key_entry(S.KEYTYPE_EXTERNAL, external_key)
    body = S.build(S.ExternalKeyPayload, {"guid": guid.bytes_le, "modified": ft, "nested": label_e + key_e})
    ext = (
        S.build(
            S.EntryHeader, {"size": 8 + len(body), "role": S.ROLE_STARTUP_KEY, "vtype": S.VT_EXTERNAL_KEY, "version": 1}
        )
        + body
    )
    total = S.DATASET_HEADER_SIZE + len(ext)
    hdr = S.build(
        S.DatasetHeader,
        {
            "size": total,
            "version": 1,
            "header_size": S.DATASET_HEADER_SIZE,
            "size_copy": total,
            "volume_guid": guid.bytes_le,
            "nonce_counter": 1,
            "method": 0,
            "method_copy": 0,
            "created": ft,
        },
    )
    out = hdr + ext
    assert len(out) == BEK_SIZE
    return out


def parse_bek(data: bytes, where: str = ".BEK file") -> StartupKey:
    """Parse a .BEK (156-byte or larger Windows 11 form): return its GUID and 32-byte key."""
    from .metadata import iter_entries  # local import: metadata depends on this module

    if len(data) < S.DATASET_HEADER_SIZE + 8:
        raise CredentialError("not a BitLocker startup key file (too short)", where)
    h = S.DatasetHeader.parse(data)
    if h.header_size != S.DATASET_HEADER_SIZE or not (S.DATASET_HEADER_SIZE < h.size <= len(data)):
        raise CredentialError("not a BitLocker startup key file (bad header)", where)
    for e in iter_entries(data[: h.size], S.DATASET_HEADER_SIZE, h.size, where):
        if e.vtype != S.VT_EXTERNAL_KEY:
            continue
        p = S.ExternalKeyPayload.parse(e.payload)
        for n in e.children():
            if n.vtype == S.VT_KEY:
                kp = S.KeyPayload.parse(n.payload)
                if len(kp.key) == 32:
                    return StartupKey(uuid.UUID(bytes_le=p.guid), kp.key, p.modified)
    raise CredentialError("the startup key file holds no external key", where)


def random_key(n: int) -> bytes:
    """``n`` random bytes from the OS CSPRNG (FVEK, VMK, external keys, salts)."""
    return os.urandom(n)
