"""[MS-KPS] key protectors: create/unwrap, grant/revoke, tamper detection, CLI errors.

Independent judges: each wrapping's TransportKey is CMS AuthEnvelopedData that ``openssl cms
-decrypt`` opens to the documented Payload_V1; the owner's GuardianSignature over the exclusive
canonical form of <Wrappings> is re-checked with ``openssl dgst``/``pkeyutl`` style verification via
``openssl`` on the canonical bytes that lxml produces.
"""

from __future__ import annotations

import base64
import os
import random
import stat
import struct
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from lxml import etree

from templatetool.errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    TemplateToolError,
    UsageError,
)
from templatetool.guardian import (
    export_metadata,
    generate_guardian,
    import_metadata,
    save_guardian,
)
from templatetool.kp import create_kp, grant, inspect_kp, revoke, unwrap

from .conftest import assert_clean_error, require_tool, run_cli

NS = "{http://schemas.microsoft.com/kps/2014/07}"


@pytest.fixture(scope="module")
def gs():
    owner = generate_guardian("Owner", "ec-p256")
    a = generate_guardian("Fabric A", "rsa3072")
    b = generate_guardian("Fabric B", "ec-p384")
    c = generate_guardian("Fabric C", "ec-p256")
    # B as a tenant sees it: public certificates from signed HGS metadata, no keys
    b_pub = import_metadata(export_metadata(b, b.signing_key, b.signing_certificate), "Fabric B",
                            allow_untrusted_root=True)
    return {"owner": owner, "a": a, "b": b, "c": c, "b_pub": b_pub}


@pytest.fixture(scope="module")
def kp(gs):
    secret = os.urandom(32)
    return secret, create_kp(secret, gs["owner"], [gs["a"], gs["b_pub"]])


def test_every_party_unwraps(gs, kp):
    secret, xml = kp
    for who in ("owner", "a", "b"):
        assert unwrap(xml, gs[who]) == secret
    with pytest.raises(CredentialError, match="no wrapping"):
        unwrap(xml, gs["c"])
    info = inspect_kp(xml)
    assert info["owner"]["role"] == "owner"
    assert [g["signing_certificate"]["subject"] for g in info["guardians"]] == [
        "CN=Shielded VM Signing Certificate (Fabric A)", "CN=Shielded VM Signing Certificate (Fabric B)"]


def test_schema_shape_and_openssl_judges(gs, kp, tmp_path):
    """The XML has the [MS-KPS] element order; openssl opens a wrapping and checks the owner's signature."""
    require_tool("openssl")
    secret, xml = kp
    root = etree.fromstring(xml)
    assert [etree.QName(c).localname for c in root] == ["Wrappings", "TransportKeySignature", "GuardianSignature"]
    w = root.find(f"{NS}Wrappings")[1]
    assert [etree.QName(c).localname for c in w] == ["Id", "SigningCertificate", "SigningCertificateSignature",
                                                     "EncryptionCertificate", "EncryptionCertificateSignature",
                                                     "TransportKey"]
    owner_id = root.find(f"{NS}Wrappings")[0].findtext(f"{NS}Id")
    assert w.find(f"{NS}SigningCertificateSignature").get("ParentWrappingId") == owner_id
    assert root.find(f"{NS}GuardianSignature").get("WrappingId") == owner_id
    # openssl decrypts guardian A's TransportKey to Payload_V1 holding the secret
    a = gs["a"]
    (tmp_path / "tk.der").write_bytes(base64.b64decode(w.findtext(f"{NS}TransportKey/{NS}EncryptedData/{NS}CipherValue")))
    (tmp_path / "a.key").write_bytes(a.encryption_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "a.crt").write_bytes(a.encryption_certificate.public_bytes(serialization.Encoding.PEM))
    cp = subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", str(tmp_path / "tk.der"),
                         "-recip", str(tmp_path / "a.crt"), "-inkey", str(tmp_path / "a.key")], capture_output=True, check=False)
    assert cp.returncode == 0, cp.stderr
    size, version, n, klen = struct.unpack("<4I", cp.stdout[:16])
    assert (size, version, n, klen) == (16 + len(secret), 1, 1, len(secret)) and cp.stdout[16:] == secret
    # the owner's GuardianSignature (ECDSA r||s over exc-c14n(Wrappings)) verifies with openssl
    wr_c14n = etree.tostring(root.find(f"{NS}Wrappings"), method="c14n", exclusive=True)
    (tmp_path / "wr.bin").write_bytes(wr_c14n)
    raw = base64.b64decode(root.findtext(f"{NS}GuardianSignature/{NS}Signature/{NS}SignatureValue"))
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    (tmp_path / "sig.der").write_bytes(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                                            int.from_bytes(raw[32:], "big")))
    (tmp_path / "owner.pub").write_bytes(gs["owner"].signing_certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cp = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "owner.pub"), "-signature",
                         str(tmp_path / "sig.der"), str(tmp_path / "wr.bin")], capture_output=True, check=False, text=True)
    assert cp.returncode == 0 and "Verified OK" in cp.stdout, cp.stdout + cp.stderr


def test_grant_then_unwrap_revoke_then_fail(gs, kp):
    secret, xml = kp
    xml2 = grant(xml, gs["owner"], gs["c"])
    assert unwrap(xml2, gs["c"]) == secret
    xml3 = revoke(xml2, gs["owner"], "Fabric A")
    with pytest.raises(CredentialError, match="revoked"):
        unwrap(xml3, gs["a"])
    for who in ("owner", "b", "c"):
        assert unwrap(xml3, gs[who]) == secret
    # revoke by thumbprint too
    xml4 = revoke(xml3, gs["owner"], gs["c"].thumbprint)
    with pytest.raises(CredentialError):
        unwrap(xml4, gs["c"])
    # only the owner may change a KP; the owner cannot be revoked; no double grant
    with pytest.raises(CredentialError, match="not the owner"):
        grant(xml, gs["a"], gs["c"])
    with pytest.raises(UsageError, match="owner cannot"):
        revoke(xml, gs["owner"], "Owner")
    with pytest.raises(UsageError, match="already"):
        grant(xml, gs["owner"], gs["a"])
    with pytest.raises(UsageError):
        revoke(xml, gs["owner"], "nobody")


def test_random_byte_flips_all_detected(gs, kp):
    _, xml = kp
    rng = random.Random(0x6b70)
    for _ in range(200):
        bad = bytearray(xml)
        pos = rng.randrange(len(bad))
        bad[pos] ^= rng.randrange(1, 256)
        with pytest.raises(TemplateToolError):
            unwrap(bytes(bad), gs["b"])


def test_targeted_tampering(gs, kp):
    _, xml = kp
    root = etree.fromstring(xml)
    # swap guardian A's encryption certificate for C's: the certificate signatures catch it
    ecert = root.find(f"{NS}Wrappings")[1].find(f"{NS}EncryptionCertificate")
    ecert.text = base64.b64encode(gs["c"].encryption_certificate.public_bytes(serialization.Encoding.DER)).decode()
    with pytest.raises(IntegrityError):
        unwrap(etree.tostring(root, method="c14n", exclusive=True), gs["b"])
    # pretty-printed (re-formatted) → not canonical
    with pytest.raises(IntegrityError, match="canonical"):
        unwrap(xml.replace(b"<Protector xmlns", b"<Protector  xmlns"), gs["b"])
    with pytest.raises(FormatError):
        unwrap(b"<Protector", gs["b"])
    with pytest.raises(FormatError):
        unwrap(b'<!DOCTYPE x [<!ENTITY a "b">]><Protector xmlns="http://schemas.microsoft.com/kps/2014/07"/>', gs["b"])


def test_cli(tmp_path, gs):
    env = {"KPW": "pw"}
    for name in ("owner", "a", "c"):
        save_guardian(gs[name], tmp_path / name, "pw")
    secret = os.urandom(48)
    (tmp_path / "s.bin").write_bytes(secret)
    k1, k2, k3 = (str(tmp_path / f"{i}.kp") for i in (1, 2, 3))
    cp = run_cli("kp", "new", "-o", k1, "--owner", str(tmp_path / "owner"), "--guardian", str(tmp_path / "a"),
                 "--secret-file", str(tmp_path / "s.bin"), "--password-env", "KPW", env=env)
    assert cp.returncode == 0, cp.stderr
    assert run_cli("kp", "show", k1).returncode == 0
    assert run_cli("kp", "grant", k1, "--owner", str(tmp_path / "owner"), "--guardian", str(tmp_path / "c"),
                   "-o", k2, "--password-env", "KPW", env=env).returncode == 0
    out = tmp_path / "out.bin"
    cp = run_cli("kp", "unwrap", k2, "--guardian", str(tmp_path / "c"), "-o", str(out), "--password-env", "KPW", env=env)
    assert cp.returncode == 0, cp.stderr
    assert out.read_bytes() == secret and stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert secret.hex() not in cp.stdout + cp.stderr
    assert run_cli("kp", "revoke", k2, "--owner", str(tmp_path / "owner"), "--guardian", str(tmp_path / "a"),
                   "-o", k3, "--password-env", "KPW", env=env).returncode == 0
    assert_clean_error(run_cli("kp", "unwrap", k3, "--guardian", str(tmp_path / "a"), "-o", str(tmp_path / "x"),
                               "--password-env", "KPW", env=env), 5)
    # malformed / tampered / not owner
    (tmp_path / "bad.kp").write_bytes(b"<Protector>")
    assert_clean_error(run_cli("kp", "show", str(tmp_path / "bad.kp")), 3)
    data = bytearray((tmp_path / "3.kp").read_bytes())
    data[len(data) // 2] ^= 0x20
    (tmp_path / "t.kp").write_bytes(bytes(data))
    cp = run_cli("kp", "show", str(tmp_path / "t.kp"))
    assert_clean_error(cp)
    assert cp.returncode in (3, 4)
    assert_clean_error(run_cli("kp", "grant", k1, "--owner", str(tmp_path / "a"), "--guardian", str(tmp_path / "c"),
                               "-o", str(tmp_path / "z.kp"), "--password-env", "KPW", env=env), 5)
    (tmp_path / "short.bin").write_bytes(b"tiny")
    assert_clean_error(run_cli("kp", "new", "-o", str(tmp_path / "q.kp"), "--owner", str(tmp_path / "owner"),
                               "--secret-file", str(tmp_path / "short.bin"), "--password-env", "KPW", env=env), 2)


@pytest.mark.slow
def test_many_byte_flips_all_detected(gs):
    """Extended: 3000 random flips over a KP with RSA and EC wrappings (all must fail cleanly)."""
    xml = create_kp(os.urandom(40), gs["owner"], [gs["a"], gs["b_pub"], gs["c"]])
    rng = random.Random(0x5eed)
    for _ in range(3000):
        bad = bytearray(xml)
        pos = rng.randrange(len(bad))
        bad[pos] ^= rng.randrange(1, 256)
        with pytest.raises(TemplateToolError):
            unwrap(bytes(bad), gs["c"])
