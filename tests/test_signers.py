"""Signers (PFX modern/legacy, PEM, PKCS#11 on SoftHSM2) and CMS SignedData, judged by openssl."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import require_module, require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from templatetool.cms.signed import sign_data, verify_signed_data
from templatetool.errors import (CredentialError, FormatError, IntegrityError, PolicyError, TemplateToolError,
                                 UsageError)
from templatetool.signers import PemSigner, PfxSigner, Pkcs11Signer, load_signer
from templatetool.signers.certs import (ca_certificate, issue_certificate, load_pfx, new_key, self_signed,
                                        thumbprint, write_pfx)
from templatetool.signers.pkcs11_signer import parse_pkcs11_uri

PEM = serialization.Encoding.PEM


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(PEM))
    return path


def openssl_verify(tmp: Path, der: bytes, ca: x509.Certificate, content: bytes | None = None) -> bytes:
    """openssl cms -verify (the independent judge); returns the verified content."""
    require_tool("openssl")
    sig = tmp / "sig.der"
    sig.write_bytes(der)
    cafile = _pem(tmp / "ca.pem", ca)
    out = tmp / "out.bin"
    cmd = ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-purpose", "any",
           "-CAfile", str(cafile), "-out", str(out)]
    if content is not None:
        (tmp / "content.bin").write_bytes(content)
        cmd += ["-content", str(tmp / "content.bin")]
    cp = subprocess.run(cmd, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    return out.read_bytes()


# -- certificates and PFX ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rsa2048", "ec-p256", "ec-p384"])
def test_certificate_key_usage(kind: str) -> None:
    k = new_key(kind)
    s = self_signed("CN=Sign", k, "signing")
    e = self_signed("CN=Enc", k, "encryption")
    ku_s = s.extensions.get_extension_for_class(x509.KeyUsage).value
    ku_e = e.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku_s.digital_signature and not ku_s.key_encipherment
    if kind.startswith("rsa"):
        assert ku_e.key_encipherment and not ku_e.digital_signature
    else:
        assert ku_e.key_agreement and not ku_e.digital_signature
    s.verify_directly_issued_by(s)  # self-signature valid
    assert s.public_key().public_numbers() == k.public_key().public_numbers()


def test_write_pfx_is_0600_aes_and_openssl_reads_it(tmp_path: Path) -> None:
    require_tool("openssl")
    k = new_key("rsa2048")
    c = self_signed("CN=Pfx", k)
    p = tmp_path / "id.pfx"
    write_pfx(p, k, c, b"s3cret")
    assert (p.stat().st_mode & 0o777) == 0o600
    cp = subprocess.run(["openssl", "pkcs12", "-info", "-in", str(p), "-noout", "-passin", "pass:s3cret"],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert "AES-256-CBC" in cp.stderr + cp.stdout
    k2, c2, chain = load_pfx(p, b"s3cret")
    assert c2 == c and chain == []
    assert k2.private_numbers() == k.private_numbers()  # type: ignore[union-attr]
    with pytest.raises(CredentialError):
        load_pfx(p, b"wrong")


@pytest.mark.parametrize("legacy", [["-certpbe", "PBE-SHA1-3DES", "-keypbe", "PBE-SHA1-3DES", "-macalg", "sha1"],
                                    ["-legacy"]])
def test_legacy_pfx_from_openssl(tmp_path: Path, legacy: list[str]) -> None:
    require_tool("openssl")
    k = new_key("rsa2048")
    c = self_signed("CN=Legacy", k)
    (tmp_path / "k.pem").write_bytes(k.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _pem(tmp_path / "c.pem", c)
    out = tmp_path / "legacy.pfx"
    cp = subprocess.run(["openssl", "pkcs12", "-export", *legacy, "-inkey", str(tmp_path / "k.pem"),
                         "-in", str(tmp_path / "c.pem"), "-out", str(out), "-passout", "pass:pw"],
                        capture_output=True, text=True)
    if cp.returncode != 0 and legacy == ["-legacy"]:
        pytest.skip(f"this openssl cannot write -legacy (RC2) files: {cp.stderr.strip()[:120]}")
    assert cp.returncode == 0, cp.stderr
    info = subprocess.run(["openssl", "pkcs12", "-info", "-noout", "-in", str(out), "-passin", "pass:pw", *(
        ["-legacy"] if legacy == ["-legacy"] else [])], capture_output=True, text=True)
    assert "AES" not in info.stderr  # really a legacy file
    s = load_signer(str(out), password="pw")
    assert isinstance(s, PfxSigner) and s.certificate == c
    der = sign_data(b"legacy pfx content", s)
    assert openssl_verify(tmp_path, der, c) == b"legacy pfx content"
    with pytest.raises(CredentialError):
        load_pfx(out, b"nope")


def test_pem_signer_with_chain_and_encrypted_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca_k = new_key("ec-p384")
    ca = ca_certificate("CN=Test CA", ca_k)
    k = new_key("rsa3072")
    c = issue_certificate("CN=PEM Leaf", k.public_key(), ca_k, ca)
    (tmp_path / "key.pem").write_bytes(k.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.BestAvailableEncryption(b"kpw")))
    _pem(tmp_path / "cert.pem", c)
    _pem(tmp_path / "chain.pem", ca)
    s = load_signer(f"pem:{tmp_path/'key.pem'},{tmp_path/'cert.pem'},{tmp_path/'chain.pem'}", password=b"kpw")
    assert isinstance(s, PemSigner) and s.chain == [ca]
    der = sign_data(b"\n\r\n binary \x00 bytes \n", s, pss=True)
    # openssl checks the chain up to the CA we give it, the exact bytes, and the PSS signature.
    assert openssl_verify(tmp_path, der, ca) == b"\n\r\n binary \x00 bytes \n"
    info = verify_signed_data(der, trust=[ca])
    assert info.trust_anchor == ca and info.signer_cert == c and info.signature_algorithm == "rsassa_pss"
    with pytest.raises(CredentialError):
        load_signer(f"pem:{tmp_path/'key.pem'},{tmp_path/'cert.pem'}", password="bad")
    with pytest.raises(CredentialError, match="needs a password"):
        load_signer(f"pem:{tmp_path/'key.pem'},{tmp_path/'cert.pem'}")
    with pytest.raises(UsageError):
        load_signer("pem:only-one-part")


# -- CMS ------------------------------------------------------------------------------------------

def _pfx_signer(tmp: Path, kind: str, subject: str = "CN=CMS Test", usage: str = "signing",
                not_before: dt.datetime | None = None, days: int = 3650) -> PfxSigner:
    k = new_key(kind)
    c = self_signed(subject, k, usage, days=days, not_before=not_before)
    p = tmp / f"{kind}-{usage}.pfx"
    write_pfx(p, k, c, None)
    return PfxSigner(str(p))


@pytest.mark.parametrize("kind,pss,digest", [("rsa2048", False, "sha256"), ("rsa2048", True, "sha256"),
                                             ("ec-p256", False, "sha256"), ("ec-p384", False, "sha384")])
@pytest.mark.parametrize("detached", [False, True])
def test_cms_sign_openssl_verifies(tmp_path: Path, kind: str, pss: bool, digest: str, detached: bool) -> None:
    s = _pfx_signer(tmp_path, kind)
    content = os.urandom(3000) + b"\n\n"
    der = sign_data(content, s, pss=pss, digest=digest, detached=detached)
    got = openssl_verify(tmp_path, der, s.certificate, content if detached else None)
    assert got == content
    info = verify_signed_data(der, content=content if detached else None, trust=[s.certificate])
    assert info.content == content and info.signer_cert == s.certificate
    assert info.signing_time is not None and abs((info.signing_time - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 120
    if detached:
        with pytest.raises(IntegrityError):
            verify_signed_data(der, content=content + b"x")


def test_cms_every_bit_flip_is_rejected(tmp_path: Path) -> None:
    s = _pfx_signer(tmp_path, "ec-p256")
    der = sign_data(b"catalog bytes " * 8, s)
    verify_signed_data(der)
    accepted = []
    for i in range(len(der)):
        b = bytearray(der)
        b[i] ^= 0x01
        try:
            verify_signed_data(bytes(b))
            accepted.append(i)
        except TemplateToolError:
            pass
    assert accepted == []


def test_cms_policy_failures(tmp_path: Path) -> None:
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired = _pfx_signer(tmp_path, "ec-p256", "CN=Old", not_before=old, days=10)
    der = sign_data(b"x", expired)
    with pytest.raises(PolicyError, match="expired"):
        verify_signed_data(der)
    assert verify_signed_data(der, at=old + dt.timedelta(days=1)).content == b"x"
    enc = _pfx_signer(tmp_path, "rsa2048", "CN=Enc", usage="encryption")
    with pytest.raises(PolicyError, match="key usage"):
        verify_signed_data(sign_data(b"x", enc))
    good = _pfx_signer(tmp_path, "ec-p256", "CN=Good")
    other = _pfx_signer(tmp_path, "ec-p384", "CN=Other")
    with pytest.raises(PolicyError, match="trusted"):
        verify_signed_data(sign_data(b"x", good), trust=[other.certificate])
    with pytest.raises(FormatError):
        verify_signed_data(b"\x30\x03\x02\x01\x00")


def test_pkcs11_uri_parsing() -> None:
    u = parse_pkcs11_uri("pkcs11:token=My%20Token;object=key1;id=%01%ff?module-path=/x/lib.so")
    assert u.path["token"] == "My Token" and u.path["object"] == "key1" and u._raw_id == b"\x01\xff"
    assert u.query["module-path"] == "/x/lib.so"
    with pytest.raises(UsageError):
        parse_pkcs11_uri("pkcs11:token=t?pin-value=1234")
    with pytest.raises(UsageError):
        parse_pkcs11_uri("file:x")


# -- PKCS#11 (SoftHSM2) ------------------------------------------------------------------------------

SOFTHSM_PATHS = ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                 "/usr/local/lib/softhsm/libsofthsm2.so", "/opt/homebrew/lib/softhsm/libsofthsm2.so"]


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A SoftHSM2 token in a temp dir (no root): an RSA and an EC key, certificates from a test CA."""
    require_tool("softhsm2-util")
    pkcs11 = require_module("pkcs11")
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
    from pkcs11.util.x509 import decode_x509_certificate

    module = os.environ.get("TEMPLATETOOL_PKCS11_MODULE") or next((p for p in SOFTHSM_PATHS if os.path.exists(p)), None)
    if module is None:
        require_tool("libsofthsm2.so")  # skip/fail with a clear message
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d/'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old_conf = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before the module is loaded (C_Initialize reads it)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "tt-test", "--pin", "1234",
                    "--so-pin", "12345678"], check=True, capture_output=True)
    lib = pkcs11.lib(module)
    lib.reinitialize()  # pick up a token created after an earlier load in this process
    token = lib.get_token(token_label="tt-test")
    ca_k = new_key("ec-p256")
    ca = ca_certificate("CN=HSM Test CA", ca_k)
    certs = {}
    with token.open(user_pin="1234", rw=True) as s:
        priv_t = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        rpub, _ = s.generate_keypair(KeyType.RSA, 2048, store=True, label="rsa-key", id=b"\x01",
                                     private_template=priv_t)
        rsa_pub = rsa.RSAPublicNumbers(int.from_bytes(rpub[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(rpub[Attribute.MODULUS], "big")).public_key()
        params = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                                            local=True)
        epub, _ = params.generate_keypair(store=True, label="ec-key", id=b"\x02", private_template=priv_t)
        ec_pub = serialization.load_der_public_key(encode_ec_public_key(epub))
        for label, kid, pub in (("rsa-key", b"\x01", rsa_pub), ("ec-key", b"\x02", ec_pub)):
            c = issue_certificate(f"CN=HSM {label}", pub, ca_k, ca)
            certs[label] = c
            attrs = decode_x509_certificate(c.public_bytes(serialization.Encoding.DER))
            attrs.update({Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: kid})
            s.create_object(attrs)
    # the token really offers the mechanisms the HSM signer relies on
    assert {Mechanism.RSA_PKCS_PSS, Mechanism.ECDSA} <= set(token.slot.get_mechanisms())
    yield {"module": module, "ca": ca, "certs": certs}
    if old_conf is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old_conf


@pytest.mark.parametrize("label,pss", [("rsa-key", True), ("rsa-key", False), ("ec-key", False)])
def test_pkcs11_signer_signs_in_token(tmp_path: Path, softhsm: dict, label: str, pss: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEMPLATETOOL_PKCS11_PIN", raising=False)  # the PIN is a value, not an env var
    uri = f"pkcs11:token=tt-test;object={label}?module-path={softhsm['module']}"
    s = load_signer(uri, pin="1234")
    assert isinstance(s, Pkcs11Signer)
    try:
        assert s.certificate == softhsm["certs"][label]
        assert not hasattr(s, "private_key")  # no key object outside the token, only sign_raw
        content = b"signed inside the token\n" * 10
        der = sign_data(content, s, pss=pss)
        assert openssl_verify(tmp_path, der, softhsm["ca"]) == content
        info = verify_signed_data(der, trust=[softhsm["ca"]])
        assert info.signer_cert == s.certificate
        assert info.signature_algorithm == ("rsassa_pss" if pss else "rsassa_pkcs1v15" if label == "rsa-key" else "sha256_ecdsa")
    finally:
        s.close()


def test_pkcs11_errors(softhsm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"pkcs11:token=tt-test;object=ec-key?module-path={softhsm['module']}"
    with pytest.raises(CredentialError):
        load_signer(uri, pin="9999")
    with pytest.raises(CredentialError, match="needs a PIN"):
        load_signer(uri)
    with pytest.raises(TemplateToolError, match="no private key"):
        load_signer(f"pkcs11:token=tt-test;object=missing?module-path={softhsm['module']}", pin="1234")
    with pytest.raises(TemplateToolError, match="no PKCS#11 token"):
        load_signer(f"pkcs11:token=nope?module-path={softhsm['module']}", pin="1234")
    # id= selects by CKA_ID (percent-encoded bytes)
    s = load_signer(f"pkcs11:token=tt-test;id=%02?module-path={softhsm['module']}", pin="1234")
    try:
        assert s.certificate == softhsm["certs"]["ec-key"]
        assert thumbprint(s.certificate) == hashlib.sha1(s.certificate.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    finally:
        s.close()


def test_pkcs11_closed_session_and_non_signing_key(tmp_path: Path, softhsm: dict) -> None:
    """Signing after close() and with a key whose CKA_SIGN is false fail with a clear, typed error
    (they used to surface as a PKCS#11/AttributeError ResourceError)."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    from templatetool.errors import ResourceError, UnsupportedError

    s = load_signer(f"pkcs11:token=tt-test;object=rsa-key?module-path={softhsm['module']}", pin="1234")
    s.close()
    with pytest.raises(ResourceError, match="session is closed"):
        s.sign_raw(b"data", hashes.SHA256())
    token = pkcs11.lib(softhsm["module"]).get_token(token_label="tt-test")
    with token.open(user_pin="1234", rw=True) as sess:
        pub, _ = sess.generate_keypair(KeyType.RSA, 2048, store=True, label="nosign-key", id=b"\x09",
                                       private_template={Attribute.SIGN: False, Attribute.SENSITIVE: True})
        rsa_pub = rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(pub[Attribute.MODULUS], "big")).public_key()
    ca_k = new_key("ec-p256")
    cert = issue_certificate("CN=no sign", rsa_pub, ca_k, ca_certificate("CN=CA", ca_k))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    uri = f"pkcs11:token=tt-test;object=nosign-key?module-path={softhsm['module']}&x-cert-path={tmp_path / 'c.pem'}"
    with load_signer(uri, pin="1234") as ns:  # type: ignore[attr-defined]
        with pytest.raises(UnsupportedError, match="not allowed to sign"):
            ns.sign_raw(b"data", hashes.SHA256())


def test_pfx_missing_and_garbage(tmp_path: Path) -> None:
    from templatetool.errors import NotFoundError

    with pytest.raises(NotFoundError):
        load_signer(str(tmp_path / "nope.pfx"))
    (tmp_path / "bad.pfx").write_bytes(b"garbage")
    with pytest.raises((FormatError, CredentialError)):
        load_signer(str(tmp_path / "bad.pfx"), password="x")


def test_protect_with_token_signer(tmp_path: Path, softhsm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole template signed inside the token (RSA-PSS); openssl checks the catalog to the CA."""
    from test_protect import make_gpt_disk

    from templatetool.catalog.vsc import verify_template
    from templatetool.pipeline.protect import protect

    disk, _, _ = make_gpt_disk(tmp_path, files={"a.txt": b"hsm\n"})
    with load_signer(f"pkcs11:token=tt-test;object=rsa-key?module-path={softhsm['module']}", pin="1234") as s:  # type: ignore[attr-defined]
        res = protect(disk, tmp_path / "t.img", "HSM", "1.0.0.0", s, pss=True)
    assert openssl_verify(tmp_path, res.der, softhsm["ca"]) == res.document.to_bytes()
    rep = verify_template(tmp_path / "t.img", trust=[softhsm["ca"]])
    assert rep.ok and rep.signer == "CN=HSM rsa-key"


@pytest.mark.parametrize("key,usage_text", [("ec-p256", "Key Agreement"), ("rsa2048", "Key Encipherment")])
def test_cli_cert_new_encryption(tmp_path: Path, key: str, usage_text: str) -> None:
    """`cert new --encryption`: PFX 0600 that openssl opens, key usage as documented (openssl judges)."""
    from conftest import assert_clean_error, run_cli

    require_tool("openssl")
    env = {"TT_CERT_PW": "pw"}
    cp = run_cli("cert", "new", "--encryption", "--subject", "CN=Enc", "-o", str(tmp_path / "enc.pfx"), "--key", key,
                 "--password-env", "TT_CERT_PW", env=env)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "enc.pfx").stat().st_mode & 0o777 == 0o600
    txt = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "enc.crt"), "-noout", "-text"],
                         capture_output=True, text=True, check=True).stdout
    assert usage_text in txt and "Digital Signature" not in txt
    k, c, _ = load_pfx(tmp_path / "enc.pfx", b"pw")
    assert c.public_bytes(serialization.Encoding.PEM) == (tmp_path / "enc.crt").read_bytes()
    assert_clean_error(run_cli("cert", "new", "--subject", "CN=x", "-o", str(tmp_path / "n"),
                               "--password-env", "TT_CERT_PW", env=env), 2)
    assert_clean_error(run_cli("cert", "new", "--signing", "--subject", "bogus", "-o", str(tmp_path / "n"),
                               "--password-env", "TT_CERT_PW", env=env), 2)


def test_pkcs11_library_reads_no_module_env(softhsm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module path is a parameter: the library ignores $TEMPLATETOOL_PKCS11_MODULE (the CLI
    reads it), and a URI's module-path wins over the caller's default."""
    monkeypatch.setenv("TEMPLATETOOL_PKCS11_MODULE", softhsm["module"])
    bare = "pkcs11:token=tt-test;object=ec-key"
    with pytest.raises(UsageError, match="no PKCS#11 module given"):
        load_signer(bare, pin="1234")
    with load_signer(bare, pin="1234", pkcs11_module=softhsm["module"]) as s:  # type: ignore[attr-defined]
        assert s.certificate == softhsm["certs"]["ec-key"]
    with load_signer(f"{bare}?module-path={softhsm['module']}", pin="1234",  # type: ignore[attr-defined]
                     pkcs11_module="/nonexistent/lib.so") as s:
        assert s.certificate == softhsm["certs"]["ec-key"]


def test_cli_signer_reads_pkcs11_module_env(softhsm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from templatetool.cli.signer_opts import open_signer

    monkeypatch.setenv("TEMPLATETOOL_PKCS11_MODULE", softhsm["module"])
    monkeypatch.setenv("TEMPLATETOOL_PKCS11_PIN", "1234")
    s = open_signer("pkcs11:token=tt-test;object=rsa-key")
    try:
        assert s.certificate == softhsm["certs"]["rsa-key"]
    finally:
        s.close()  # type: ignore[attr-defined]
