"""CMS AuthEnvelopedData (AES-256-GCM, RSA-OAEP and ECDH recipients) judged by ``openssl cms``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from templatetool.cms.enveloped import envelope, list_recipients, open_envelope
from templatetool.errors import CredentialError, FormatError, IntegrityError, UsageError
from templatetool.signers.certs import new_key, self_signed

from .conftest import require_tool

KINDS = ("rsa3072", "ec-p256", "ec-p384")


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """Encryption identities (key, cert, key.pem, cert.pem) for each key kind, plus an outsider."""
    d = tmp_path_factory.mktemp("env")
    out = {}
    for kind in KINDS + ("outsider",):
        key = new_key("ec-p256" if kind == "outsider" else kind)
        cert = self_signed(f"CN=recipient {kind}", key, "encryption")
        kp, cp = d / f"{kind}.key", d / f"{kind}.crt"
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[kind] = (key, cert, kp, cp)
    return out


def _openssl_decrypt(der: Path, cert: Path, key: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(der),
                           "-recip", str(cert), "-inkey", str(key)], capture_output=True, check=False)


def test_openssl_decrypts_for_every_recipient(ids, tmp_path):
    require_tool("openssl")
    content = os.urandom(5000) + b"\n\r\n\x00tail"
    der = envelope(content, [ids[k][1] for k in KINDS])
    p = tmp_path / "env.der"
    p.write_bytes(der)
    for k in KINDS:
        cp = _openssl_decrypt(p, ids[k][3], ids[k][2])
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout == content
        assert open_envelope(der, ids[k][0], ids[k][1]) == content
    kinds = sorted(r.kind for r in list_recipients(der))
    assert kinds == ["kari", "kari", "ktri"]


def test_non_recipient_refused_by_openssl_and_us(ids, tmp_path):
    require_tool("openssl")
    der = envelope(b"secret", [ids["rsa3072"][1], ids["ec-p256"][1]])
    p = tmp_path / "env.der"
    p.write_bytes(der)
    key, cert, kp, cp_ = ids["outsider"]
    cp = _openssl_decrypt(p, cp_, kp)
    assert cp.returncode != 0
    assert b"secret" not in cp.stdout
    with pytest.raises(CredentialError, match="not a recipient"):
        open_envelope(der, key, cert)
    # a recipient certificate with someone else's key
    with pytest.raises(CredentialError, match="does not belong"):
        open_envelope(der, key, ids["ec-p256"][1])


def test_we_read_openssl_envelopes(ids, tmp_path):
    require_tool("openssl")
    content = os.urandom(777)
    src = tmp_path / "in.bin"
    src.write_bytes(content)
    out = tmp_path / "o.der"
    cp = subprocess.run(["openssl", "cms", "-encrypt", "-binary", "-aes-256-gcm", "-outform", "DER", "-in", str(src),
                         "-out", str(out),
                         "-recip", str(ids["rsa3072"][3]), "-keyopt", "rsa_padding_mode:oaep",
                         "-keyopt", "rsa_oaep_md:sha256",
                         "-recip", str(ids["ec-p256"][3]),  # openssl default: SHA-1 X9.63 KDF
                         "-recip", str(ids["ec-p384"][3]), "-keyopt", "ecdh_kdf_md:sha384"], capture_output=True, check=False)
    assert cp.returncode == 0, cp.stderr
    der = out.read_bytes()
    for k in KINDS:
        assert open_envelope(der, ids[k][0], ids[k][1]) == content


def test_tampering_detected(ids):
    key, cert = ids["ec-p256"][:2]
    der = envelope(b"A" * 64, [cert])
    # flip a byte of the ciphertext/tag region (the end of the structure)
    for pos in (len(der) - 1, len(der) - 20, len(der) - 70):
        bad = bytearray(der)
        bad[pos] ^= 0x01
        with pytest.raises((IntegrityError, FormatError, CredentialError)):
            open_envelope(bytes(bad), key, cert)


def test_bad_inputs(ids):
    key, cert = ids["rsa3072"][:2]
    with pytest.raises(FormatError):
        open_envelope(b"\x30\x03\x02\x01\x00", key, cert)
    with pytest.raises(FormatError):
        open_envelope(b"not der at all", key, cert)
    with pytest.raises(UsageError):
        envelope(b"x", [])
    signing = self_signed("CN=signing only", key, "signing")
    with pytest.raises(UsageError, match="KeyUsage"):
        envelope(b"x", [signing])
