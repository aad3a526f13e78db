"""The Signer protocol: every implementation signs bytes that cryptography and openssl verify;
secrets are values; CMS and XML-DSig accept any object implementing the protocol."""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from test_signers import openssl_verify, softhsm  # noqa: F401 - softhsm is a fixture

import templatetool
from templatetool.cms.signed import sign_data, verify_signed_data
from templatetool.errors import CredentialError, UnsupportedError, UsageError
from templatetool.signers import KeyAlgorithm, KeySigner, PemSigner, PfxSigner, Pkcs11Signer, Signer, load_signer
from templatetool.signers.certs import ca_certificate, issue_certificate, new_key, write_pfx

PEM = serialization.Encoding.PEM
DATA = b"bytes to sign\x00\xff" * 37


def _pki(kind: str) -> tuple[object, x509.Certificate, x509.Certificate]:
    ca_k = new_key("ec-p256")
    ca = ca_certificate("CN=Protocol CA", ca_k)
    k = new_key(kind)
    return k, issue_certificate(f"CN=Protocol {kind}", k.public_key(), ca_k, ca), ca


def _no_env_or_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to read a secret from the environment or a terminal fails the test."""
    import getpass

    import templatetool.secrets as secrets

    def boom(*a: object, **k: object) -> str:
        raise AssertionError("a secret was read from the environment or a prompt")

    monkeypatch.setattr(secrets, "read_secret", boom)
    monkeypatch.setattr(getpass, "getpass", boom)
    monkeypatch.delenv("TEMPLATETOOL_PKCS11_PIN", raising=False)


def _file_signer(kind: str, tmp: Path) -> tuple[Signer, x509.Certificate]:
    """PFX (encrypted, password as str), PEM (encrypted key, password as bytes) or in-memory key."""
    if kind == "pfx-rsa":
        k, c, ca = _pki("rsa2048")
        write_pfx(tmp / "s.pfx", k, c, b"pfx pw", [ca])  # type: ignore[arg-type]
        return PfxSigner(tmp / "s.pfx", password="pfx pw"), ca
    if kind == "pem-ec384":
        k, c, ca = _pki("ec-p384")
        (tmp / "k.pem").write_bytes(k.private_bytes(PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                                    serialization.BestAvailableEncryption(b"pem pw")))
        (tmp / "c.pem").write_bytes(c.public_bytes(PEM))
        return PemSigner(tmp / "k.pem", tmp / "c.pem", password=b"pem pw"), ca
    k, c, ca = _pki("ec-p256")
    return KeySigner(k, c, [ca]), ca  # type: ignore[arg-type]


def _openssl_dgst_verify(tmp: Path, cert: x509.Certificate, sig: bytes, data: bytes, pss: bool = False,
                         digest: str = "sha256") -> None:
    """openssl dgst -verify judges a raw signature (ECDSA DER, PKCS#1 v1.5 or PSS salt = digest length)."""
    require_tool("openssl")
    (tmp / "pub.pem").write_bytes(cert.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp / "sig.bin").write_bytes(sig)
    (tmp / "data.bin").write_bytes(data)
    opts = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"] if pss else []
    cp = subprocess.run(["openssl", "dgst", f"-{digest}", "-verify", str(tmp / "pub.pem"), *opts,
                         "-signature", str(tmp / "sig.bin"), str(tmp / "data.bin")], capture_output=True, text=True)
    assert cp.returncode == 0 and "Verified OK" in cp.stdout, cp.stdout + cp.stderr


def _check_signer(s: Signer, tmp: Path) -> None:
    """isinstance(Signer), and every algorithm it offers yields a signature both judges accept."""
    assert isinstance(s, Signer)
    pub = s.certificate.public_key()
    algs = [KeyAlgorithm.RSA_PKCS1, KeyAlgorithm.RSA_PSS] if isinstance(pub, rsa.RSAPublicKey) else [KeyAlgorithm.ECDSA]
    assert s.key_algorithm == algs[0]
    for alg in algs:
        for h in (hashes.SHA256(), hashes.SHA384()):
            sig = s.sign_raw(DATA, h, algorithm=alg)
            if isinstance(pub, rsa.RSAPublicKey):
                pad = (padding.PSS(padding.MGF1(h), h.digest_size) if alg == KeyAlgorithm.RSA_PSS
                       else padding.PKCS1v15())
                pub.verify(sig, DATA, pad, h)
                with pytest.raises(InvalidSignature):
                    pub.verify(sig, DATA + b"!", pad, h)
            else:
                assert isinstance(pub, ec.EllipticCurvePublicKey)
                pub.verify(sig, DATA, ec.ECDSA(h))
                with pytest.raises(InvalidSignature):
                    pub.verify(sig, DATA + b"!", ec.ECDSA(h))
            _openssl_dgst_verify(tmp, s.certificate, sig, DATA, pss=alg == KeyAlgorithm.RSA_PSS, digest=h.name)
    assert s.sign_raw(DATA, hashes.SHA256()) is not None  # default algorithm
    if isinstance(pub, ec.EllipticCurvePublicKey):
        with pytest.raises(UnsupportedError):
            s.sign_raw(DATA, hashes.SHA256(), algorithm=KeyAlgorithm.RSA_PSS)


@pytest.mark.parametrize("kind", ["pfx-rsa", "pem-ec384", "memory-ec256"])
def test_file_signers_satisfy_protocol(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_env_or_prompt(monkeypatch)  # the passwords are values: no env var, no prompt
    s, ca = _file_signer(kind, tmp_path)
    _check_signer(s, tmp_path)
    der = sign_data(b"cms content", s, pss=True)
    assert openssl_verify(tmp_path, der, ca) == b"cms content"


@pytest.mark.parametrize("label", ["rsa-key", "ec-key"])
def test_pkcs11_signer_satisfies_protocol(label: str, softhsm: dict, tmp_path: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _no_env_or_prompt(monkeypatch)  # the PIN is a value
    with Pkcs11Signer(f"pkcs11:token=tt-test;object={label}?module-path={softhsm['module']}", pin=b"1234") as s:
        _check_signer(s, tmp_path)
        # pre-hashed input: only the digest goes to the token
        h = hashes.Hash(hashes.SHA256())
        h.update(DATA)
        sig = s.sign_digest(h.finalize(), hashes.SHA256())
        _openssl_dgst_verify(tmp_path, s.certificate, sig, DATA)


def test_secret_source_is_lazy_and_passwords_are_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_env_or_prompt(monkeypatch)
    k, c, ca = _pki("ec-p256")
    write_pfx(tmp_path / "enc.pfx", k, c, b"s3cret", [])  # type: ignore[arg-type]
    write_pfx(tmp_path / "open.pfx", k, c, None, [])  # type: ignore[arg-type]
    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        return "s3cret"

    assert load_signer(str(tmp_path / "open.pfx"), password=source).certificate == c
    assert calls == []  # an unencrypted PFX never asks
    assert load_signer(str(tmp_path / "enc.pfx"), password=source).certificate == c
    assert calls == [1]
    for pw in ("s3cret", b"s3cret"):
        assert load_signer(str(tmp_path / "enc.pfx"), password=pw).certificate == c
    with pytest.raises(CredentialError, match="needs a password"):
        load_signer(str(tmp_path / "enc.pfx"))
    with pytest.raises(CredentialError):
        load_signer(str(tmp_path / "enc.pfx"), password="wrong")


class _ThirdPartySigner:
    """A Signer written by an embedding program: no base class, only the protocol's members."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cert: x509.Certificate,
                 chain: Sequence[x509.Certificate] = ()) -> None:
        self._key, self.certificate, self.chain = key, cert, list(chain)
        self.key_algorithm = KeyAlgorithm.RSA_PKCS1 if isinstance(key, rsa.RSAPrivateKey) else KeyAlgorithm.ECDSA
        self.calls = 0

    def sign_raw(self, data: bytes, digest: hashes.HashAlgorithm, *, algorithm: KeyAlgorithm | None = None) -> bytes:
        self.calls += 1
        if isinstance(self._key, rsa.RSAPrivateKey):
            pad = (padding.PSS(padding.MGF1(digest), digest.digest_size) if algorithm == KeyAlgorithm.RSA_PSS
                   else padding.PKCS1v15())
            return self._key.sign(data, pad, digest)
        return self._key.sign(data, ec.ECDSA(digest))

    def describe(self) -> str:
        return "third party"


@pytest.mark.parametrize("kind", ["rsa2048", "ec-p256", "ec-p384"])
def test_cms_and_xmldsig_call_any_protocol_signer(kind: str, tmp_path: Path) -> None:
    """Regression: sign_data needed private_key() and export_metadata a key object; both now call sign_raw."""
    require_tool("xmlsec1")
    from templatetool.guardian import export_metadata, generate_guardian, import_metadata

    k, c, ca = _pki(kind)
    s = _ThirdPartySigner(k, c, [ca])  # type: ignore[arg-type]
    assert isinstance(s, Signer)
    der = sign_data(b"catalog bytes", s, pss=kind.startswith("rsa"))
    assert openssl_verify(tmp_path, der, ca) == b"catalog bytes"
    assert verify_signed_data(der, trust=[ca]).signer_cert == c
    g = generate_guardian("Proto", "ec-p256")
    xml = export_metadata(g, s)
    assert s.calls == 2
    (tmp_path / "m.xml").write_bytes(xml)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(PEM))
    cp = subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(tmp_path / "ca.pem"), str(tmp_path / "m.xml")],
                        capture_output=True, text=True, check=False)
    assert cp.returncode == 0, cp.stderr
    assert import_metadata(xml, "proto", trust=[ca, g.signing_certificate]).signing_certificate == g.signing_certificate
    bad = xml.replace(b"<Version>1</Version>", b"<Version>2</Version>")
    (tmp_path / "bad.xml").write_bytes(bad)
    assert subprocess.run(["xmlsec1", "--verify", "--trusted-pem", str(tmp_path / "ca.pem"), str(tmp_path / "bad.xml")],
                          capture_output=True, check=False).returncode != 0


def test_sign_data_refuses_a_non_signer() -> None:
    """Regression: an object that is not a Signer raised AttributeError (a traceback), now UsageError."""
    with pytest.raises(UsageError, match="not a Signer"):
        sign_data(b"x", object())  # type: ignore[arg-type]


_KEY_CLASSES = {"RSAPrivateKey", "EllipticCurvePrivateKey", "DSAPrivateKey", "Ed25519PrivateKey", "Ed448PrivateKey",
                "X25519PrivateKey", "X448PrivateKey", "DHPrivateKey"}
_PRIVATE_ATTRS = {"_salt_length", "_algorithm", "_mgf", "_digest_size"}


def test_no_cryptography_key_subclass_or_private_attribute() -> None:
    """No module subclasses a cryptography private-key class or reads its private attributes."""
    root = Path(templatetool.__file__).parent
    found: list[str] = []
    for py in sorted(root.rglob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"), str(py))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for b in node.bases:
                    name = b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "")
                    if name in _KEY_CLASSES:
                        found.append(f"{py.relative_to(root)}:{node.lineno} class {node.name}({name})")
            elif isinstance(node, ast.Attribute) and node.attr in _PRIVATE_ATTRS:
                found.append(f"{py.relative_to(root)}:{node.lineno} .{node.attr}")
    assert found == []
