"""Keys: recovery passwords, the SHA-256 stretch, AES-CCM wrapping with unique nonces, .BEK files."""

from __future__ import annotations

import hashlib
import os
import struct
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from templatetool.bitlocker import keys as K
from templatetool.errors import CredentialError

from .conftest import require_samples

SAMPLE_RP = "284867-596541-514998-422114-660297-261613-215424-199408"


def test_recovery_password_parse_known_sample() -> None:
    # The key16 of the dissect.fve sample (reference note section 5.2).
    assert K.parse_recovery_password(SAMPLE_RP).hex() == "2965d7d3e2b6e6957beae75c804cd046"
    assert K.parse_recovery_password(SAMPLE_RP.replace("-", "")) == K.parse_recovery_password(SAMPLE_RP)
    assert K.format_recovery_key(K.parse_recovery_password(SAMPLE_RP)) == SAMPLE_RP


def test_recovery_password_generate_roundtrip() -> None:
    seen = set()
    for _ in range(50):
        rp = K.generate_recovery_password()
        groups = rp.split("-")
        assert len(groups) == 8 and all(len(g) == 6 and int(g) % 11 == 0 and int(g) < 720896 for g in groups)
        assert K.format_recovery_key(K.parse_recovery_password(rp)) == rp
        seen.add(rp)
    assert len(seen) == 50


@pytest.mark.parametrize("group", [1, 4, 8])
def test_recovery_password_bad_group_named(group: int) -> None:
    g = SAMPLE_RP.split("-")
    g[group - 1] = f"{int(g[group - 1]) + 1:06d}"  # no longer divisible by 11
    with pytest.raises(CredentialError) as ei:
        K.parse_recovery_password("-".join(g))
    assert f"group {group}" in str(ei.value)
    assert "-".join(g) not in str(ei.value)  # never echo the secret


@pytest.mark.parametrize("bad", ["", "123", SAMPLE_RP + "-000000", SAMPLE_RP.replace("2", "x", 1),
                                 "720896-" + SAMPLE_RP[7:]])
def test_recovery_password_malformed(bad: str) -> None:
    with pytest.raises(CredentialError):
        K.parse_recovery_password(bad)


@pytest.mark.parametrize("path", ["native", "python"])
def test_stretch_matches_definition(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from templatetool.native import built

    if path == "native" and not built():
        if os.environ.get("TEMPLATETOOL_CI"):
            pytest.fail("templatetool._xts was not built: CI must test the fast path")
        pytest.skip("templatetool._xts not built")
    if path == "python":
        monkeypatch.setenv("TEMPLATETOOL_NATIVE", "0")
    # Reference: the struct { last_hash, initial_hash, salt, u64 count } hashed round by round.
    init, salt = hashlib.sha256(b"a").digest(), bytes(range(16))
    h = bytes(32)
    for i in range(1000):
        h = hashlib.sha256(h + init + salt + struct.pack("<Q", i)).digest()
    assert K.stretch_key(init, salt, rounds=1000) == h
    full = K.stretch_key(init, salt)
    assert len(full) == 32 and full != h
    # both implementations agree on the full 2^20 rounds
    monkeypatch.setenv("TEMPLATETOOL_NATIVE", "0" if path == "native" else "1")
    if built():
        assert K.stretch_key(init, salt) == full


def test_ccm_wrap_standard_layout_and_tamper() -> None:
    key = K.random_key(32)
    plain = K.key_entry(K.S.KEYTYPE_VMK, K.random_key(32))
    payload = K.ccm_wrap(key, plain, 0x01D7BC6FADA80F43, 7)
    assert len(payload) == 12 + 16 + 44
    nonce, tag, ct = payload[:12], payload[12:28], payload[28:]
    assert nonce == struct.pack("<QI", 0x01D7BC6FADA80F43, 7)
    # Independent check with cryptography's AESCCM: on disk it is nonce || tag || ciphertext.
    assert AESCCM(key, tag_length=16).decrypt(nonce, ct + tag, None) == plain
    assert K.ccm_unwrap(key, payload) == plain
    bad = bytearray(payload)
    bad[40] ^= 1
    with pytest.raises(CredentialError):
        K.ccm_unwrap(key, bytes(bad))
    with pytest.raises(CredentialError):
        K.ccm_unwrap(K.random_key(32), payload)


def test_nonce_sources_never_repeat() -> None:
    seen = set()
    for _ in range(200):
        ns = K.NonceSource()
        for _ in range(5):
            n = ns.next()
            assert n not in seen
            seen.add(n)


def test_bek_roundtrip_156_bytes() -> None:
    g = uuid.uuid4()
    key = K.random_key(32)
    bek = K.build_bek(g, key)
    assert len(bek) == 156
    sk = K.parse_bek(bek)
    assert sk.guid == g and sk.key == key
    assert key.hex() not in repr(sk)
    with pytest.raises(CredentialError):
        K.parse_bek(b"not a bek file at all" * 3)


def test_bek_matches_windows_layout() -> None:
    d = require_samples()
    win = (d / "startup_key.bek").read_bytes()
    sk = K.parse_bek(win)
    assert sk.guid == uuid.UUID("b3411a58-3400-420a-8b7e-9b5f706425c0")
    ours = K.build_bek(sk.guid, sk.key, sk.created)
    # Same layout as Windows: only the dataset creation time / nonce counter fields may differ.
    assert len(ours) == len(win) == 156
    assert ours[0x30:] == win[0x30:]
