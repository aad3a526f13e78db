"""Guardians: generation, PFX storage, HGS metadata XML judged by ``xmlsec1``, trust checks, CLI errors."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from templatetool.errors import CredentialError, IntegrityError, PolicyError
from templatetool.guardian import (
    export_metadata,
    generate_guardian,
    import_metadata,
    load_guardian,
    save_guardian,
)
from templatetool.signers.certs import ca_certificate, issue_certificate, new_key

from .conftest import assert_clean_error, require_tool, run_cli

PW = {"GPW": "correct horse"}


@pytest.fixture(scope="module")
def guardians(tmp_path_factory):
    d = tmp_path_factory.mktemp("guardians")
    out = {}
    for kind in ("rsa3072", "ec-p256", "ec-p384"):
        g = generate_guardian(f"G {kind}", kind)
        save_guardian(g, d / kind, PW["GPW"])
        out[kind] = (g, d / kind)
    return out


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("kind", ["rsa3072", "ec-p256", "ec-p384"])
def test_generated_guardian_profile_and_storage(guardians, kind, monkeypatch):
    g, path = guardians[kind]
    for cert, role in ((g.signing_certificate, "signing"), (g.encryption_certificate, "encryption")):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        pub = cert.public_key()
        if role == "signing":
            assert ku.digital_signature and not ku.key_encipherment and not ku.key_agreement
        elif isinstance(pub, rsa.RSAPublicKey):
            assert ku.key_encipherment and not ku.digital_signature
        else:
            assert ku.key_agreement and not ku.digital_signature
        if kind == "rsa3072":
            assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 3072
        else:
            assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert cert.issuer == cert.subject
        cert.verify_directly_issued_by(cert)
        assert f"({g.name})" in cert.subject.rfc4514_string()
    for f in ("signing.pfx", "encryption.pfx"):
        assert stat.S_IMODE(os.stat(path / f).st_mode) == 0o600
        assert b"PRIVATE KEY" not in (path / f).read_bytes()
    monkeypatch.setenv("GPW_T", PW["GPW"])
    full = load_guardian(path, private=True, password_env="GPW_T")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert full.signing_key.public_key().public_bytes(*spki) == g.signing_certificate.public_key().public_bytes(*spki)
    assert full.encryption_key.public_key().public_bytes(*spki) == \
        g.encryption_certificate.public_key().public_bytes(*spki)
    monkeypatch.setenv("GPW_T", "wrong")
    with pytest.raises(CredentialError):
        load_guardian(path, private=True, password_env="GPW_T")


@pytest.mark.parametrize("kind", ["rsa3072", "ec-p256", "ec-p384"])
def test_metadata_verifies_with_xmlsec1_and_tamper_fails(guardians, kind, tmp_path):
    require_tool("xmlsec1")
    g, _ = guardians[kind]
    xml = export_metadata(g, g.signing_key, g.signing_certificate)
    f = tmp_path / "meta.xml"
    f.write_bytes(xml)
    signer = tmp_path / "signer.pem"
    signer.write_bytes(_pem(g.signing_certificate))
    cp = subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(signer), str(f)], capture_output=True, check=False, text=True)
    assert cp.returncode == 0, cp.stderr
    assert "OK" in cp.stdout + cp.stderr
    back = import_metadata(xml, "fabric", allow_untrusted_root=True)
    assert back.signing_certificate == g.signing_certificate
    assert back.encryption_certificate == g.encryption_certificate
    # tamper: swap in another encryption certificate (the attack the signature prevents)
    other = guardians["ec-p256" if kind != "ec-p256" else "rsa3072"][0]
    import base64

    evil = xml.replace(base64.b64encode(g.encryption_certificate.public_bytes(serialization.Encoding.DER)),
                       base64.b64encode(other.encryption_certificate.public_bytes(serialization.Encoding.DER)))
    assert evil != xml
    bad = tmp_path / "bad.xml"
    bad.write_bytes(evil)
    cp = subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(signer), str(bad)], capture_output=True, check=False, text=True)
    assert cp.returncode != 0
    with pytest.raises(IntegrityError):
        import_metadata(evil, "fabric", allow_untrusted_root=True)


def test_metadata_trust_rules(guardians):
    g, _ = guardians["rsa3072"]
    xml = export_metadata(g, g.signing_key, g.signing_certificate)
    with pytest.raises(PolicyError, match="untrusted root"):
        import_metadata(xml, "fabric")
    # trusting the signer certificate explicitly is enough
    import_metadata(xml, "fabric", trust=[g.signing_certificate])
    # an HGS-style setup: a CA issues the communications certificate that signs the metadata
    ca_key = new_key("ec-p256")
    ca = ca_certificate("CN=HGS Root", ca_key)
    comm_key = new_key("ec-p256")
    comm = issue_certificate("CN=HGS Communications", comm_key.public_key(), ca_key, ca, "signing")
    xml2 = export_metadata(g, comm_key, comm)
    with pytest.raises(PolicyError):
        import_metadata(xml2, "fabric")
    with pytest.raises(PolicyError):  # the guardian's own self-signed certificates are still untrusted
        import_metadata(xml2, "fabric", trust=[ca])
    got = import_metadata(xml2, "fabric", trust=[ca, g.signing_certificate])
    assert got.source == "imported"
    # an expired guardian
    old = generate_guardian("old", "ec-p256", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    xml3 = export_metadata(old, g.signing_key, g.signing_certificate)
    with pytest.raises(PolicyError, match="expired"):
        import_metadata(xml3, "old", trust=[g.signing_certificate, old.signing_certificate])
    import_metadata(xml3, "old", trust=[g.signing_certificate, old.signing_certificate], allow_expired=True)


def test_cli_roundtrip_and_clean_errors(tmp_path):
    require_tool("xmlsec1")
    env = {"GPW": "pw-1"}
    d = tmp_path / "fab"
    cp = run_cli("guardian", "new", "Fabric 1", "-o", str(d), "--key", "ec-p256", "--password-env", "GPW", env=env)
    assert cp.returncode == 0, cp.stderr
    meta = json.loads((d / "guardian.json").read_text())
    assert meta["pfx_encrypted"] is True
    assert "pw-1" not in cp.stdout + cp.stderr + (d / "guardian.json").read_text()
    assert not any(b"PRIVATE KEY" in f.read_bytes() for f in d.iterdir())
    x = tmp_path / "fab.xml"
    cp = run_cli("guardian", "export", str(d), "-o", str(x), "--password-env", "GPW", env=env)
    assert cp.returncode == 0, cp.stderr
    signer = tmp_path / "s.pem"
    signer.write_bytes((d / "signing.pem").read_bytes())
    assert subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(signer), str(x)],
                          capture_output=True, check=False).returncode == 0
    # an external signer (pem:KEY,CERT), as HGS signs with its communications certificate
    ck = new_key("ec-p384")
    from templatetool.signers.certs import self_signed

    comm = self_signed("CN=HGS Communications", ck, "signing")
    (tmp_path / "comm.key").write_bytes(ck.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "comm.pem").write_bytes(_pem(comm))
    x2 = tmp_path / "fab2.xml"
    cp = run_cli("guardian", "export", str(d), "-o", str(x2), "--password-env", "GPW",
                 "--signer", f"pem:{tmp_path / 'comm.key'},{tmp_path / 'comm.pem'}", env=env)
    assert cp.returncode == 0, cp.stderr
    assert subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(tmp_path / "comm.pem"), str(x2)],
                          capture_output=True, check=False).returncode == 0
    assert subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(signer), str(x2)],
                          capture_output=True, check=False).returncode != 0
    cp = run_cli("guardian", "import", str(x2), "-o", str(tmp_path / "imp2"), "--trust", str(tmp_path / "comm.pem"),
                 "--trust", str(signer))
    assert cp.returncode == 0, cp.stderr
    # untrusted root without the flag → clean policy error; with it → imported
    assert_clean_error(run_cli("guardian", "import", str(x), "-o", str(tmp_path / "imp")), 6)
    cp = run_cli("guardian", "import", str(x), "-o", str(tmp_path / "imp"), "--allow-untrusted-root", "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["source"] == "imported"
    cp = run_cli("guardian", "show", str(tmp_path / "imp"), "--json")
    assert json.loads(cp.stdout)["result"]["has_private_keys"] is False
    # tampered XML → integrity error; malformed XML → format error
    t = tmp_path / "t.xml"
    t.write_bytes(x.read_bytes().replace(b"<Version>1</Version>", b"<Version>2</Version>"))
    assert_clean_error(run_cli("guardian", "import", str(t), "-o", str(tmp_path / "t"), "--allow-untrusted-root"), 4)
    m = tmp_path / "m.xml"
    m.write_bytes(x.read_bytes()[:-40])
    assert_clean_error(run_cli("guardian", "import", str(m), "-o", str(tmp_path / "m"), "--allow-untrusted-root"), 3)
    # wrong password → credential error; missing env var → credential error
    assert_clean_error(run_cli("guardian", "export", str(d), "-o", str(tmp_path / "y.xml"), "--password-env", "GPW",
                               env={"GPW": "nope"}), 5)
    assert_clean_error(run_cli("guardian", "export", str(d), "-o", str(tmp_path / "y.xml"), "--password-env", "NOPE_X"), 5)
    # no password source and no terminal → one clean line
    assert_clean_error(run_cli("guardian", "new", "X", "-o", str(tmp_path / "x")), 2)
    # unencrypted keys only on request, with a warning
    cp = run_cli("guardian", "new", "Y", "-o", str(tmp_path / "y"), "--no-password")
    assert cp.returncode == 0 and "unencrypted" in cp.stderr
    assert_clean_error(run_cli("guardian", "new", "Y", "-o", str(tmp_path / "y"), "--no-password"), 2)


SOFTHSM_PATHS = ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                 "/usr/local/lib/softhsm/libsofthsm2.so"]


def test_export_signed_by_pkcs11_key(tmp_path):
    """Guardian metadata signed by a key that never leaves a SoftHSM2 token; xmlsec1 verifies it."""
    require_tool("softhsm2-util", "pkcs11-tool", "xmlsec1")
    module = next((p for p in SOFTHSM_PATHS if os.path.exists(p)), None)
    if module is None:
        require_tool("libsofthsm2.so")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf), "GPW": "pw", "TEMPLATETOOL_PKCS11_PIN": "1234"}
    full_env = {**os.environ, **env}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "gd", "--pin", "1234", "--so-pin", "5678"],
                   check=True, capture_output=True, env=full_env)
    subprocess.run(["pkcs11-tool", "--module", module, "--token-label", "gd", "--login", "--pin", "1234",
                    "--keypairgen", "--key-type", "EC:prime256v1", "--label", "comm", "--id", "01"],
                   check=True, capture_output=True, env=full_env)
    pub_der = subprocess.run(["pkcs11-tool", "--module", module, "--token-label", "gd", "--read-object",
                              "--type", "pubkey", "--id", "01"], check=True, capture_output=True, env=full_env).stdout
    pub = serialization.load_der_public_key(pub_der)
    ca_key = new_key("ec-p256")
    ca = ca_certificate("CN=HGS Root", ca_key)
    comm = issue_certificate("CN=HGS Communications (HSM)", pub, ca_key, ca, "signing")
    (tmp_path / "comm.pem").write_bytes(_pem(comm))
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    g = generate_guardian("HSM Fabric", "rsa3072")
    save_guardian(g, tmp_path / "g", "pw")
    out = tmp_path / "meta.xml"
    uri = f"pkcs11:token=gd;object=comm?module-path={module}&x-cert-path={tmp_path / 'comm.pem'}"
    cp = run_cli("guardian", "export", str(tmp_path / "g"), "-o", str(out), "--password-env", "GPW", "--signer", uri,
                 env=env)
    assert cp.returncode == 0, cp.stderr
    cp = subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(tmp_path / "ca.pem"), str(out)],
                        capture_output=True, text=True, check=False)
    assert cp.returncode == 0, cp.stderr
    got = import_metadata(out.read_bytes(), "hsm", trust=[ca, g.signing_certificate])
    assert got.encryption_certificate == g.encryption_certificate
