"""swtpm's encrypted state blob: parse, decrypt, encrypt and re-key it in Python.

swtpm started with ``--key fd=N,format=binary,mode=aes-256-cbc`` keeps its state files
(``tpm2-00.permall``) as: header (version 2, flags ENCRYPTED|256BIT_KEY) ‖ TLV ciphertext ‖
TLV HMAC ‖ TLV IV, where

* ciphertext = AES-256-CBC(K, IV[:16], libtpms blob ‖ pad), the pad filling up to a multiple of
  the **key length** (32 bytes, not the AES block): n bytes of value n, n = 1..32;
* the IV TLV holds key-length (32) random bytes, of which CBC uses the first 16;
* HMAC = HMAC-SHA256(K, ciphertext ‖ IV TLV value), with the same raw key K.

Measured against swtpm 0.7.1 and pinned in tests/test_swtpm_state.py; the spec is
docs/formats/vtpm-state.md. Key material never reaches messages or logs.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from hashlib import sha256

from construct import ConstructError
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import CredentialError, FormatError, IntegrityError, UnsupportedError, UsageError
from . import swtpm_structs as st

#: The transport key K: a raw AES-256 key.
KEY_SIZE = 32
_BLOCK = 16
#: swtpm's state files are KiB to a few hundred KiB; refuse absurd inputs unread.
MAX_STATE = 16 << 20


def new_transport_key() -> bytes:
    """A fresh random 32-byte transport key K."""
    return os.urandom(KEY_SIZE)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise UsageError(
            f"the vTPM state key must be {KEY_SIZE} raw bytes (AES-256)", hint="a binary key file of exactly 32 bytes"
        )
    return bytes(key)


@dataclass(frozen=True)
class StateBlob:
    """A parsed swtpm state blob (header fields and TLVs, in file order)."""

    version: int
    min_version: int
    flags: int
    tlvs: tuple[tuple[int, bytes], ...]

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & st.FLAG_ENCRYPTED)

    def tlv(self, tag: int) -> bytes | None:
        """The value of the first TLV with ``tag``, or None."""
        for t, v in self.tlvs:
            if t == tag:
                return v
        return None

    def to_json(self) -> dict[str, object]:
        """Public description (no key material; the ciphertext is described by its size)."""
        return {
            "version": self.version,
            "min_version": self.min_version,
            "flags": f"0x{self.flags:02x}",
            "encrypted": self.encrypted,
            "cipher": "aes-256-cbc" if self.encrypted else None,
            "tlvs": [{"tag": t, "length": len(v)} for t, v in self.tlvs],
        }


def parse_state(data: bytes, where: str = "vTPM state") -> StateBlob:
    """Parse and sanity-check a state blob's header and TLVs (FormatError/UnsupportedError)."""
    if len(data) > MAX_STATE:
        raise FormatError(f"vTPM state too large ({len(data)} bytes)", where)
    if len(data) < st.HEADER_SIZE:
        raise FormatError("not a swtpm state blob (shorter than its header)", where)
    hdr = st.BLOB_HEADER.parse(data[: st.HEADER_SIZE])
    if (
        hdr.version < st.BLOB_MIN_VERSION
        or hdr.hdrSize < st.HEADER_SIZE
        or hdr.hdrSize > len(data)
        or hdr.minVersion > hdr.version
    ):
        raise FormatError(
            "not a swtpm state blob (bad header)", where, "give tpm2-00.permall of a swtpm state directory"
        )
    if hdr.totalLength != len(data):
        raise FormatError(
            f"swtpm state blob length {len(data)} differs from its header ({hdr.totalLength})",
            where,
            "the file is truncated or has trailing bytes",
        )
    if hdr.minVersion > st.BLOB_VERSION or hdr.hdrSize != st.HEADER_SIZE:
        raise UnsupportedError(
            f"swtpm state blob version {hdr.version} (header {hdr.hdrSize} bytes) is not supported", where
        )
    try:
        blob = st.STATE_BLOB.parse(data)
    except ConstructError:
        raise FormatError("malformed TLV in the swtpm state blob", where) from None
    migration = st.FLAG_MIGRATION_ENCRYPTED | st.FLAG_MIGRATION_DATA | st.FLAG_MIGRATION_256BIT_KEY
    if hdr.flags & migration:
        raise UnsupportedError(f"swtpm migration state blobs (flags 0x{hdr.flags:02x}) are not supported", where)
    if hdr.flags & ~(st.FLAG_ENCRYPTED | st.FLAG_ENCRYPTED_256BIT_KEY):
        raise UnsupportedError(f"unknown swtpm state flags 0x{hdr.flags:02x}", where)
    out = StateBlob(hdr.version, hdr.minVersion, hdr.flags, tuple((t.tag, bytes(t.value)) for t in blob.tlvs))
    tags = [t for t, _ in out.tlvs]
    if out.encrypted:
        if not hdr.flags & st.FLAG_ENCRYPTED_256BIT_KEY:
            raise UnsupportedError(
                "swtpm state encrypted with a 128-bit key", where, "templatetool uses aes-256-cbc state keys"
            )
        if sorted(tags) != [st.TAG_ENCRYPTED_DATA, st.TAG_HMAC, st.TAG_IVEC_ENCRYPTED_DATA]:
            raise FormatError(
                f"encrypted swtpm state needs exactly the ciphertext, HMAC and IV TLVs (has tags {tags})", where
            )
        ct, mac, iv = (out.tlv(t) for t in (st.TAG_ENCRYPTED_DATA, st.TAG_HMAC, st.TAG_IVEC_ENCRYPTED_DATA))
        assert ct is not None and mac is not None and iv is not None
        if not ct or len(ct) % KEY_SIZE:
            raise FormatError(f"swtpm state ciphertext of {len(ct)} bytes is not a multiple of the key length", where)
        if len(mac) != 32:
            raise FormatError(f"swtpm state HMAC of {len(mac)} bytes (HMAC-SHA256 has 32)", where)
        if len(iv) not in (_BLOCK, KEY_SIZE):
            raise FormatError(f"swtpm state IV of {len(iv)} bytes", where)
    elif tags != [st.TAG_DATA]:
        raise FormatError(f"unencrypted swtpm state needs one data TLV (has tags {tags})", where)
    return out


def _mac(key: bytes, ct: bytes, iv: bytes) -> bytes:
    return hmac.new(key, ct + iv, sha256).digest()


def decrypt_state(data: bytes, key: bytes | None, where: str = "vTPM state") -> bytes:
    """The libtpms state inside a swtpm state blob. An encrypted blob needs ``key`` and is
    verified (HMAC) before it is decrypted: a wrong key or an altered blob is an IntegrityError.
    An unencrypted blob is returned as is when ``key`` is None."""
    blob = parse_state(data, where)
    if not blob.encrypted:
        if key is not None:
            raise IntegrityError(
                "the vTPM state is not encrypted, but a key was given",
                where,
                "an encrypted state was expected: the file may have been replaced",
            )
        v = blob.tlv(st.TAG_DATA)
        assert v is not None
        return v
    if key is None:
        raise CredentialError("the vTPM state is encrypted: its key is needed", where, "pass the transport key file")
    key = _check_key(key)
    ct, mac, iv = (blob.tlv(t) for t in (st.TAG_ENCRYPTED_DATA, st.TAG_HMAC, st.TAG_IVEC_ENCRYPTED_DATA))
    assert ct is not None and mac is not None and iv is not None
    if not hmac.compare_digest(_mac(key, ct, iv), mac):
        raise IntegrityError(
            "the vTPM state does not verify with this key (HMAC-SHA256)",
            where,
            "wrong transport key, or the state was altered",
        )
    dec = Cipher(algorithms.AES(key), modes.CBC(iv[:_BLOCK])).decryptor()
    plain = dec.update(ct) + dec.finalize()
    n = plain[-1]
    if not 1 <= n <= KEY_SIZE or plain[-n:] != bytes([n]) * n:
        raise FormatError("the decrypted vTPM state has bad padding", where)
    return plain[:-n]


def _blob(flags: int, tlvs: list[tuple[int, bytes]]) -> bytes:
    body = [{"tag": t, "value": v} for t, v in tlvs]
    total = st.HEADER_SIZE + sum(6 + len(v) for _, v in tlvs)
    out: bytes = st.STATE_BLOB.build(
        {
            "header": {
                "version": st.BLOB_VERSION,
                "minVersion": st.BLOB_MIN_VERSION,
                "hdrSize": st.HEADER_SIZE,
                "flags": flags,
                "totalLength": total,
            },
            "tlvs": body,
        }
    )
    return out


def encrypt_state(plain: bytes, key: bytes, iv: bytes | None = None) -> bytes:
    """A swtpm state blob holding ``plain`` (the libtpms state) encrypted with ``key`` exactly as
    swtpm does (a random 32-byte IV unless one is given, for byte-exact reproduction)."""
    key = _check_key(key)
    if not plain:
        raise UsageError("empty vTPM state")
    if iv is None:
        iv = os.urandom(KEY_SIZE)
    if len(iv) not in (_BLOCK, KEY_SIZE):
        raise UsageError(f"IV must be {_BLOCK} or {KEY_SIZE} bytes")
    n = KEY_SIZE - len(plain) % KEY_SIZE
    enc = Cipher(algorithms.AES(key), modes.CBC(iv[:_BLOCK])).encryptor()
    ct = enc.update(plain + bytes([n]) * n) + enc.finalize()
    return _blob(
        st.FLAG_ENCRYPTED | st.FLAG_ENCRYPTED_256BIT_KEY,
        [(st.TAG_ENCRYPTED_DATA, ct), (st.TAG_HMAC, _mac(key, ct, iv)), (st.TAG_IVEC_ENCRYPTED_DATA, iv)],
    )


def plain_state(plain: bytes) -> bytes:
    """An unencrypted swtpm state blob holding ``plain`` (what swtpm writes without ``--key``)."""
    if not plain:
        raise UsageError("empty vTPM state")
    return _blob(0, [(st.TAG_DATA, plain)])


def rekey_state(data: bytes, old_key: bytes | None, new_key: bytes, where: str = "vTPM state") -> bytes:
    """Re-encrypt a state blob under ``new_key`` (``old_key`` None: the input is unencrypted).
    The old blob is verified first; a fresh IV is used."""
    return encrypt_state(decrypt_state(data, old_key, where), new_key)


__all__ = [
    "KEY_SIZE",
    "StateBlob",
    "decrypt_state",
    "encrypt_state",
    "new_transport_key",
    "parse_state",
    "plain_state",
    "rekey_state",
]
