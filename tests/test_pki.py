"""One PKI module (templatetool.pki): certificate chains must end at a real CA path.

Refusals (non-CA issuer, missing keyCertSign, expired / not-yet-valid intermediate, wrong EKU,
path length) each give a one-line reason; RSA-PSS and ECDSA chains verify (openssl agrees).
The forged guardian signing certificate — "issued" by a leaf of a trusted root — is refused end
to end: guardian metadata import (library and CLI) and PDK owner verification (library and CLI).
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from templatetool.errors import IntegrityError, PolicyError

from .conftest import assert_clean_error, require_tool, run_cli

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


def _ec(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, key, issuer: x509.Certificate | None = None, issuer_key=None, *, ca: bool | None = False,
          path_length: int | None = None, key_cert_sign: bool = True, eku: list | None = None,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          pss: bool = False) -> x509.Certificate:
    """A test certificate; ``ca=None`` leaves basicConstraints out; self-signed without ``issuer``."""
    b = (x509.CertificateBuilder().subject_name(_name(cn))
         .issuer_name(issuer.subject if issuer is not None else _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 30 * DAY))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    is_ca = bool(ca)
    b = b.add_extension(x509.KeyUsage(not is_ca, False, False, False, False, is_ca and key_cert_sign, is_ca,
                                      False, False), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    signer = issuer_key or key
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    kw = {}
    if pss:
        kw["rsa_padding"] = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    h = hashes.SHA384() if isinstance(signer, ec.EllipticCurvePrivateKey) and signer.curve.key_size >= 384 \
        else hashes.SHA256()
    return b.sign(signer, h, **kw)


@pytest.fixture(scope="module")
def pki():
    """Root CA → intermediate CA → leaf, plus the root's keys to make variants."""
    rk, ik, lk = _ec(), _ec(), _ec()
    root = _cert("PKI Root", rk, ca=True)
    inter = _cert("PKI Intermediate", ik, root, rk, ca=True)
    leaf = _cert("PKI Leaf", lk, inter, ik, eku=[ExtendedKeyUsageOID.CODE_SIGNING])
    return {"rk": rk, "ik": ik, "lk": lk, "root": root, "inter": inter, "leaf": leaf}


def _pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def _openssl_verify(tmp_path: Path, root, inters, leaf) -> subprocess.CompletedProcess[str]:
    require_tool("openssl")
    args = ["openssl", "verify", "-purpose", "any", "-CAfile", str(_pem(tmp_path / "root.pem", root))]
    if inters:
        args += ["-untrusted", str(_pem(tmp_path / "inter.pem", *inters))]
    return subprocess.run([*args, str(_pem(tmp_path / "leaf.pem", leaf))], capture_output=True, text=True,
                          check=False)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------
# verify_chain itself
# ------------------------------------------------------------------------------------------------


def test_good_chain_returns_the_path(pki) -> None:
    from templatetool.pki import CODE_SIGNING, verify_chain

    p = verify_chain(pki["leaf"], [pki["inter"]], [pki["root"]], eku=CODE_SIGNING)
    assert p.chain == [pki["leaf"], pki["inter"], pki["root"]] and p.trusted and p.anchor == pki["root"]
    # a pinned leaf is its own anchor
    assert verify_chain(pki["leaf"], [], [pki["leaf"]]).chain == [pki["leaf"]]


def test_non_ca_issuer_refused(pki, tmp_path: Path) -> None:
    from templatetool.pki import verify_chain

    fk = _ec()
    forged = _cert("Forged", fk, pki["leaf"], pki["lk"])  # the leaf "issues" a certificate
    with pytest.raises(PolicyError) as e:
        verify_chain(forged, [pki["leaf"], pki["inter"]], [pki["root"]])
    assert "issuer CN=PKI Leaf is not a CA (basicConstraints)" in _one_line(e)
    # no basicConstraints at all is no CA either
    nobc_k = _ec()
    nobc = _cert("No BC", nobc_k, pki["inter"], pki["ik"], ca=None)
    child = _cert("Child", _ec(), nobc, nobc_k)
    with pytest.raises(PolicyError, match=r"issuer CN=No BC is not a CA \(basicConstraints\)"):
        verify_chain(child, [nobc, pki["inter"]], [pki["root"]])
    # ... even when the untrusted-root escape hatch is open, and even when the non-CA is trusted
    with pytest.raises(PolicyError, match="is not a CA"):
        verify_chain(forged, [pki["leaf"]], [], allow_untrusted_root=True)
    with pytest.raises(PolicyError, match="is not a CA"):
        verify_chain(forged, [], [pki["leaf"]])
    assert _openssl_verify(tmp_path, pki["root"], [pki["inter"], pki["leaf"]], forged).returncode != 0


def test_missing_keycertsign_refused(pki) -> None:
    from templatetool.pki import verify_chain

    ik = _ec()
    inter = _cert("No KeyCertSign", ik, pki["root"], pki["rk"], ca=True, key_cert_sign=False)
    leaf = _cert("Leaf", _ec(), inter, ik)
    with pytest.raises(PolicyError) as e:
        verify_chain(leaf, [inter], [pki["root"]])
    assert "issuer CN=No KeyCertSign lacks keyCertSign (keyUsage)" in _one_line(e)


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_expired_and_not_yet_valid_intermediate(pki, when: str) -> None:
    from templatetool.pki import verify_chain

    ik = _ec()
    window = dict(not_before=NOW - 10 * DAY, not_after=NOW - DAY) if when == "expired" else \
        dict(not_before=NOW + DAY, not_after=NOW + 10 * DAY)
    inter = _cert("Old CA", ik, pki["root"], pki["rk"], ca=True, **window)
    leaf = _cert("Leaf", _ec(), inter, ik, not_before=NOW - 20 * DAY, not_after=NOW + 20 * DAY)
    with pytest.raises(PolicyError) as e:
        verify_chain(leaf, [inter], [pki["root"]])
    expect = "intermediate CN=Old CA expired on" if when == "expired" else "intermediate CN=Old CA is not valid before"
    assert expect in _one_line(e)
    # --allow-expired: judged inside the common validity period; validity at that time is real
    p = verify_chain(leaf, [inter], [pki["root"]], allow_expired=True)
    assert inter.not_valid_before_utc <= p.validated_at <= inter.not_valid_after_utc
    if when == "not-yet-valid":  # at a time every certificate is valid, no flag is needed
        verify_chain(leaf, [inter], [pki["root"]], at=NOW + 2 * DAY)


def test_wrong_eku_refused(pki) -> None:
    from templatetool.pki import CODE_SIGNING, verify_chain

    server = _cert("TLS Server", _ec(), pki["inter"], pki["ik"], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(PolicyError) as e:
        verify_chain(server, [pki["inter"]], [pki["root"]], eku=CODE_SIGNING)
    assert "wrong extended key usage: CN=TLS Server is not issued for codeSigning" in _one_line(e)
    no_eku = _cert("No EKU", _ec(), pki["inter"], pki["ik"])
    with pytest.raises(PolicyError, match="wrong extended key usage"):
        verify_chain(no_eku, [pki["inter"]], [pki["root"]], eku=CODE_SIGNING)
    verify_chain(no_eku, [pki["inter"]], [pki["root"]])  # no EKU asked: absent EKU is any purpose


def test_path_length_violation_refused(pki, tmp_path: Path) -> None:
    from templatetool.pki import verify_chain

    i1k, i2k = _ec(), _ec()
    i1 = _cert("CA Level 1", i1k, pki["root"], pki["rk"], ca=True, path_length=0)
    i2 = _cert("CA Level 2", i2k, i1, i1k, ca=True)
    leaf = _cert("Deep Leaf", _ec(), i2, i2k)
    with pytest.raises(PolicyError) as e:
        verify_chain(leaf, [i1, i2], [pki["root"]])
    assert "path length exceeded: CN=CA Level 1 allows 0 intermediate CA(s) below it, the chain has 1" in _one_line(e)
    assert _openssl_verify(tmp_path, pki["root"], [i1, i2], leaf).returncode != 0
    verify_chain(_cert("Shallow", _ec(), i1, i1k), [i1], [pki["root"]])  # within the limit


def test_rsa_pss_chain_verifies(tmp_path: Path) -> None:
    from templatetool.pki import verify_chain

    rk, ik, lk = (rsa.generate_private_key(65537, 2048) for _ in range(3))
    root = _cert("PSS Root", rk, ca=True, pss=True)
    inter = _cert("PSS Intermediate", ik, root, rk, ca=True, pss=True)
    leaf = _cert("PSS Leaf", lk, inter, ik, pss=True)
    assert isinstance(leaf.signature_algorithm_parameters, padding.PSS)
    assert verify_chain(leaf, [inter], [root]).chain == [leaf, inter, root]
    cp = _openssl_verify(tmp_path, root, [inter], leaf)
    assert cp.returncode == 0, cp.stderr + cp.stdout


def test_ecdsa_chain_verifies(tmp_path: Path) -> None:
    from templatetool.pki import verify_chain

    rk, ik, lk = _ec(ec.SECP384R1()), _ec(ec.SECP256R1()), _ec(ec.SECP384R1())
    root = _cert("EC Root", rk, ca=True)
    inter = _cert("EC Intermediate", ik, root, rk, ca=True)
    leaf = _cert("EC Leaf", lk, inter, ik)
    assert verify_chain(leaf, [inter], [root]).chain == [leaf, inter, root]
    assert _openssl_verify(tmp_path, root, [inter], leaf).returncode == 0


def test_untrusted_root_and_bad_signature(pki) -> None:
    from templatetool.pki import verify_chain

    other = _cert("Other Root", _ec(), ca=True)
    with pytest.raises(PolicyError, match="cannot find the issuer CN=PKI Root"):
        verify_chain(pki["leaf"], [pki["inter"]], [other])
    with pytest.raises(PolicyError, match="untrusted root: CN=PKI Root is not trusted"):
        verify_chain(pki["leaf"], [pki["inter"], pki["root"]], [other])
    p = verify_chain(pki["leaf"], [pki["inter"], pki["root"]], [], allow_untrusted_root=True)
    assert p.anchor == pki["root"] and not p.trusted
    # same issuer name, another key: the signature does not verify with the issuer we hold
    impostor = _cert("PKI Intermediate", _ec(), pki["root"], pki["rk"], ca=True)
    with pytest.raises(IntegrityError, match="does not verify with the key of its issuer"):
        verify_chain(pki["leaf"], [impostor], [pki["root"]])


def test_weak_rsa_issuer_refused(pki) -> None:
    from templatetool.pki import verify_chain

    wk = rsa.generate_private_key(65537, 1024)
    weak_ca = _cert("Weak CA", wk, pki["root"], pki["rk"], ca=True)
    leaf = _cert("Leaf", _ec(), weak_ca, wk)
    with pytest.raises(PolicyError, match=r"RSA key of issuer CN=Weak CA is too weak \(1024 bits"):
        verify_chain(leaf, [weak_ca], [pki["root"]])


def test_sha1_signature_refused(tmp_path: Path) -> None:
    """SHA-1 (which cryptography will not even create) is refused with the algorithm named, not as tampering."""
    from templatetool.pki import verify_chain

    require_tool("openssl")

    def ossl(*a: str) -> None:
        subprocess.run(["openssl", *a], cwd=tmp_path, check=True, capture_output=True)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rk.pem", "-out", "root.pem", "-subj", "/CN=SHA1 Root",
         "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "lk.pem", "-out", "l.csr",
         "-subj", "/CN=SHA1 Leaf")
    ossl("x509", "-req", "-in", "l.csr", "-CA", "root.pem", "-CAkey", "rk.pem", "-set_serial", "7", "-out", "leaf.pem",
         "-days", "10", "-sha1")
    root = x509.load_pem_x509_certificate((tmp_path / "root.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((tmp_path / "leaf.pem").read_bytes())
    with pytest.raises(PolicyError, match="CN=SHA1 Leaf is signed with sha1WithRSAEncryption, which is not accepted"):
        verify_chain(leaf, [], [root])


# ------------------------------------------------------------------------------------------------
# The callers: guardian metadata import, PDK owner, CMS signer, health certificates
# ------------------------------------------------------------------------------------------------


def _guardian_issued_by(issuer: x509.Certificate, issuer_key, chain: list[x509.Certificate], name: str = "Evil"):
    """A guardian (with keys) whose signing and encryption certificates ``issuer`` issued."""
    from templatetool.guardian import Guardian
    from templatetool.guardian.sigalg import sign_bytes

    sk, ek = _ec(), _ec()
    sign_cert = _cert(f"Shielded VM Signing Certificate ({name})", sk, issuer, issuer_key)
    b = (x509.CertificateBuilder().subject_name(_name(f"Shielded VM Encryption Certificate ({name})"))
         .issuer_name(issuer.subject).public_key(ek.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, True, False, False, False, False), critical=True))
    enc_cert = b.sign(issuer_key, hashes.SHA256())
    ecs = sign_bytes(sk, enc_cert.public_bytes(serialization.Encoding.DER))
    return Guardian(name, sign_cert, enc_cert, sk, ek, other_signing_certificates=chain, source="generated",
                    encryption_signature=ecs)


def _forged_guardian(pki):
    """A guardian whose certificates were "issued" by the root's leaf (an end entity, not a CA)."""
    return _guardian_issued_by(pki["leaf"], pki["lk"], [pki["leaf"], pki["inter"]])


def test_forged_guardian_metadata_import_refused(pki, tmp_path: Path) -> None:
    """Regression: check_chain accepted a non-CA issuer whose name matched and signature verified."""
    from templatetool.guardian import export_metadata, import_metadata

    evil = _forged_guardian(pki)
    # the metadata is signed by the leaf itself (a genuine end-entity of the trusted root)
    xml = export_metadata(evil, pki["lk"], pki["leaf"], [pki["inter"]])
    with pytest.raises(PolicyError) as e:
        import_metadata(xml, "evil", trust=[pki["root"]])
    assert "issuer CN=PKI Leaf is not a CA (basicConstraints)" in _one_line(e)
    meta = tmp_path / "evil.xml"
    meta.write_bytes(xml)
    _pem(tmp_path / "root.pem", pki["root"])
    cp = run_cli("guardian", "import", str(meta), "-o", str(tmp_path / "imp"), "--trust", str(tmp_path / "root.pem"))
    assert_clean_error(cp, 6)
    assert "is not a CA (basicConstraints)" in cp.stderr
    assert not (tmp_path / "imp" / "guardian.json").exists()


def test_forged_pdk_owner_refused(pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a PDK signed by a forged owner certificate was reported "trusted (chains to --trust)"."""
    from templatetool.guardian import generate_guardian
    from templatetool.pdk import NamedFile, SecretPart, create_pdk, read_pdk
    from templatetool.pdk import shielding

    evil = _forged_guardian(pki)
    fabric = generate_guardian("Fabric", "ec-p256")
    # the attacker's own tool skips our checks when making the PDK
    monkeypatch.setattr(shielding, "check_guardian", lambda *a, **k: None)
    secret = SecretPart(NamedFile("unattend.xml", b"<unattend/>"), [], {})
    der, _ = create_pdk(evil, [fabric], [], secret, "encryption-supported")
    monkeypatch.undo()
    with pytest.raises(PolicyError) as e:
        read_pdk(der, trust=[pki["root"]])
    assert "issuer CN=PKI Leaf is not a CA (basicConstraints)" in _one_line(e)
    (tmp_path / "evil.pdk").write_bytes(der)
    _pem(tmp_path / "root.pem", pki["root"])
    cp = run_cli("pdk", "verify", str(tmp_path / "evil.pdk"), "--trust", str(tmp_path / "root.pem"))
    assert_clean_error(cp, 6)
    assert "is not a CA (basicConstraints)" in cp.stderr


def test_cms_signer_path_length_enforced(pki) -> None:
    """Regression: cms.signed.build_chain ignored pathLenConstraint."""
    from templatetool.cms.signed import sign_data, verify_signed_data
    from templatetool.signers.base import KeySigner

    i1k, i2k, lk = _ec(), _ec(), _ec()
    i1 = _cert("CMS CA 1", i1k, pki["root"], pki["rk"], ca=True, path_length=0)
    i2 = _cert("CMS CA 2", i2k, i1, i1k, ca=True)
    leaf = _cert("CMS Signer", lk, i2, i2k)

    der = sign_data(b"catalog", KeySigner(lk, leaf, [i2, i1]))
    with pytest.raises(PolicyError, match="path length exceeded: CN=CMS CA 1"):
        verify_signed_data(der, trust=[pki["root"]])
    assert verify_signed_data(der, trust=[i2]).trust_anchor == i2  # trusting the lower CA is fine


def test_rsa_pss_health_certificate_verifies(tmp_path: Path) -> None:
    """Regression: verify_health_certificate hard-coded PKCS#1 v1.5 and refused an RSA-PSS signed certificate."""
    from templatetool.hgs.attest import HEALTH_EKU, verify_health_certificate

    ca_key, host_key = rsa.generate_private_key(65537, 2048), _ec()
    ca = _cert("HGS Attestation", ca_key, ca=True, pss=True)
    hc = _cert("Health host1", host_key, ca, ca_key, eku=[HEALTH_EKU], pss=True)
    verify_health_certificate(hc, ca)
    wrong = _cert("Health host2", host_key, ca, ca_key, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], pss=True)
    with pytest.raises(PolicyError, match="wrong extended key usage"):
        verify_health_certificate(wrong, ca)
    # a health certificate "issued" by a non-CA attestation certificate
    fake_ca = _cert("HGS Fake", ca_key, eku=[HEALTH_EKU])
    with pytest.raises(PolicyError, match="is not a CA"):
        verify_health_certificate(_cert("Health host3", host_key, fake_ca, ca_key, eku=[HEALTH_EKU]), fake_ca)


def test_ca_issued_pdk_owner_with_chain_verifies(pki, tmp_path: Path) -> None:
    """Regression: read_pdk took the first embedded certificate as the signer; DER sorts that SET, so a
    PDK whose owner embeds its CA chain failed with "not signed by the owner it names"."""
    from templatetool.guardian import Guardian, generate_guardian
    from templatetool.guardian.sigalg import sign_bytes
    from templatetool.pdk import NamedFile, SecretPart, create_pdk, read_pdk

    sk, ek = _ec(), _ec()
    sign_cert = _cert("Shielded VM Signing Certificate (Owner)", sk, pki["inter"], pki["ik"])
    b = (x509.CertificateBuilder().subject_name(_name("Shielded VM Encryption Certificate (Owner)"))
         .issuer_name(pki["inter"].subject).public_key(ek.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, True, False, False, False, False), critical=True))
    enc_cert = b.sign(pki["ik"], hashes.SHA256())
    owner = Guardian("Owner", sign_cert, enc_cert, sk, ek, other_signing_certificates=[pki["inter"]],
                     source="certificates",
                     encryption_signature=sign_bytes(sk, enc_cert.public_bytes(serialization.Encoding.DER)))
    secret = SecretPart(NamedFile("unattend.xml", b"<unattend/>"), [], {})
    der, _ = create_pdk(owner, [generate_guardian("Fabric", "ec-p256")], [], secret, "encryption-supported",
                        trust=[pki["root"]])
    info = read_pdk(der, trust=[pki["root"]])
    assert info.owner_trust == "trusted (chains to --trust)"
    (tmp_path / "ok.pdk").write_bytes(der)
    cp = run_cli("pdk", "verify", str(tmp_path / "ok.pdk"), "--trust", str(_pem(tmp_path / "root.pem", pki["root"])))
    assert cp.returncode == 0, cp.stderr
    assert "owner trusted (chains to --trust)" in cp.stdout
    other = _cert("Other Root", _ec(), ca=True)
    with pytest.raises(PolicyError, match="cannot find the issuer CN=PKI Root"):
        read_pdk(der, trust=[other])


@pytest.mark.parametrize("case", ["no-keycertsign", "expired-ca", "path-length"])
def test_guardian_import_cli_reasons(pki, tmp_path: Path, case: str) -> None:
    """Each chain refusal reaches the CLI as one line with its reason (exit 6)."""
    from templatetool.guardian import export_metadata

    ck = _ec()
    if case == "no-keycertsign":
        ca = _cert("Fabric CA", ck, pki["root"], pki["rk"], ca=True, key_cert_sign=False)
        chain, reason = [ca], "issuer CN=Fabric CA lacks keyCertSign (keyUsage)"
    elif case == "expired-ca":
        ca = _cert("Fabric CA", ck, pki["root"], pki["rk"], ca=True, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
        chain, reason = [ca], "intermediate CN=Fabric CA expired on"
    else:
        top_key = _ec()
        top = _cert("Fabric Policy CA", top_key, pki["root"], pki["rk"], ca=True, path_length=0)
        ca = _cert("Fabric CA", ck, top, top_key, ca=True)
        chain, reason = [ca, top], "path length exceeded: CN=Fabric Policy CA allows 0"
    g = _guardian_issued_by(ca, ck, chain, "Fabric")
    meta = tmp_path / "fabric.xml"
    meta.write_bytes(export_metadata(g, pki["lk"], pki["leaf"], [pki["inter"]]))
    cp = run_cli("guardian", "import", str(meta), "-o", str(tmp_path / "imp"), "--trust",
                 str(_pem(tmp_path / "root.pem", pki["root"])))
    assert_clean_error(cp, 6)
    assert reason in cp.stderr
    assert len([ln for ln in cp.stderr.splitlines() if ln.strip()]) == 1
    if case == "expired-ca":
        assert "--allow-expired" in cp.stderr
