"""Guardian-side attestation: host key and TPM modes, health certificates, refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from templatetool.errors import FormatError, IntegrityError, PolicyError
from templatetool.hgs import AttestationPolicy, attest, create_evidence, new_host, verify_health_certificate
from templatetool.hgs.attest import check_evidence
from templatetool.hgs.host import pem_public
from templatetool.signers.certs import ca_certificate, new_key
from templatetool.tpm.eventlog import write_agile_log

from .conftest import require_tool

SHA1, SHA256 = 0x0004, 0x000B


def tcg_log(kernel: bytes = b"bootmgr v1") -> bytes:
    """A small crypto-agile log: firmware into PCR 0, boot manager into PCR 4, Secure Boot into 7."""
    events = []
    for pcr, data in ((0, b"firmware"), (4, kernel), (7, b"secureboot=1"), (11, b"bitlocker")):
        events.append((pcr, 0x80000001, {SHA1: hashlib.sha1(data).digest(), SHA256: hashlib.sha256(data).digest()}, data))
    return write_agile_log(events)


@pytest.fixture(scope="module")
def guardian_keys():
    key = new_key("ec-p256")
    return key, ca_certificate("CN=HGS Attestation", key)


@pytest.fixture
def host(tmp_path: Path):
    return new_host("host1", tmp_path / "host", key="ec-p256")


def test_host_key_mode_issues_health_cert(host, guardian_keys) -> None:
    key, cert = guardian_keys
    pol = AttestationPolicy()
    pol.add_host_key("host1", pem_public(host.host_key.public_key()))
    hc, checks = attest(pol, create_evidence(host), key, cert)
    assert all(c.passed for c in checks)
    assert hc.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        host.encryption_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    verify_health_certificate(hc, cert)
    life = hc.not_valid_after_utc - hc.not_valid_before_utc
    assert dt.timedelta(hours=8) <= life <= dt.timedelta(hours=8, minutes=10)


def test_health_cert_verifies_with_openssl(tmp_path: Path, host, guardian_keys) -> None:
    require_tool("openssl")
    key, cert = guardian_keys
    pol = AttestationPolicy()
    pol.add_host_key("host1", pem_public(host.host_key.public_key()))
    hc, _ = attest(pol, create_evidence(host), key, cert)
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "hc.pem").write_bytes(hc.public_bytes(serialization.Encoding.PEM))
    cp = subprocess.run(["openssl", "verify", "-partial_chain", "-purpose", "any", "-CAfile", str(tmp_path / "ca.pem"),
                         str(tmp_path / "hc.pem")], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_unregistered_host_key_refused(host, guardian_keys) -> None:
    key, cert = guardian_keys
    with pytest.raises(PolicyError, match="host key registered"):
        attest(AttestationPolicy(), create_evidence(host), key, cert)


def test_tampered_evidence_refused(host, guardian_keys) -> None:
    key, cert = guardian_keys
    pol = AttestationPolicy()
    pol.add_host_key("host1", pem_public(host.host_key.public_key()))
    doc = json.loads(create_evidence(host))
    doc["evidence"]["host"] = "evil"
    with pytest.raises(PolicyError, match="evidence signature"):
        attest(pol, json.dumps(doc).encode(), key, cert)


@pytest.mark.parametrize("data", [b"", b"{}", b"not json", b'{"evidence": 1, "signature": "x", "signature_algorithm": "y"}'])
def test_malformed_evidence(data: bytes, guardian_keys) -> None:
    key, cert = guardian_keys
    with pytest.raises(FormatError):
        attest(AttestationPolicy(), data, key, cert)


def _tpm_policy(ek) -> AttestationPolicy:
    pol = AttestationPolicy()
    pol.add_tpm_host("host1", pem_public(ek.public_key()))
    pol.set_baseline_from_log(tcg_log())
    pol.allow_ci_policy("ab" * 32)
    return pol


def test_tpm_mode_passes_and_refuses_each_check(host, guardian_keys) -> None:
    key, cert = guardian_keys
    ek = new_key("rsa2048")
    pol = _tpm_policy(ek)
    ok = create_evidence(host, tcg_log=tcg_log(), ek_public_pem=pem_public(ek.public_key()), ci_policy_hash="ab" * 32)
    hc, checks = attest(pol, ok, key, cert)
    assert [c.name for c in checks] == ["evidence signature", "TPM endorsement key registered", "PCR baseline",
                                        "code integrity policy"]
    bad_pcr = create_evidence(host, tcg_log=tcg_log(b"bootmgr v2 (rootkit)"),
                              ek_public_pem=pem_public(ek.public_key()), ci_policy_hash="ab" * 32)
    with pytest.raises(PolicyError, match=r"PCR\(s\) 4 differ"):
        attest(pol, bad_pcr, key, cert)
    other_ek = new_key("rsa2048")
    with pytest.raises(PolicyError, match="endorsement key"):
        attest(pol, create_evidence(host, tcg_log=tcg_log(), ek_public_pem=pem_public(other_ek.public_key()),
                                    ci_policy_hash="ab" * 32), key, cert)
    with pytest.raises(PolicyError, match="CI policy"):
        attest(pol, create_evidence(host, tcg_log=tcg_log(), ek_public_pem=pem_public(ek.public_key()),
                                    ci_policy_hash="cd" * 32), key, cert)


def test_expired_and_foreign_health_certs(host, guardian_keys) -> None:
    key, cert = guardian_keys
    pol = AttestationPolicy()
    pol.add_host_key("host1", pem_public(host.host_key.public_key()))
    hc, _ = attest(pol, create_evidence(host), key, cert)
    with pytest.raises(PolicyError, match="expired"):
        verify_health_certificate(hc, cert, at=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=9))
    other = new_key("ec-p256")
    other_cert = ca_certificate("CN=HGS Attestation", other)  # same subject, different key
    with pytest.raises(IntegrityError):
        verify_health_certificate(hc, other_cert)


def test_policy_round_trip(tmp_path: Path, host) -> None:
    pol = AttestationPolicy()
    pol.add_host_key("host1", pem_public(host.host_key.public_key()))
    pol.set_baseline_from_log(tcg_log())
    pol.save(tmp_path)
    again = AttestationPolicy.load(tmp_path)
    assert again.to_json() == pol.to_json()
    (tmp_path / "attestation.json").write_text("{bad")
    with pytest.raises(FormatError):
        AttestationPolicy.load(tmp_path)


def test_check_evidence_reports_all(host) -> None:
    checks, body = check_evidence(AttestationPolicy(), create_evidence(host))
    assert body["host"] == "host1"
    assert [c.passed for c in checks] == [True, False]


def test_cli_flow_and_refusals(tmp_path: Path) -> None:
    from .conftest import assert_clean_error, run_cli

    g, h = tmp_path / "guardian", tmp_path / "host"
    assert run_cli("hgs", "init", str(g)).returncode == 0
    assert run_cli("host", "new", "h1", "-o", str(h)).returncode == 0
    assert run_cli("host", "evidence", str(h), "-o", str(tmp_path / "ev.json")).returncode == 0
    cp = run_cli("hgs", "attest", str(g), str(tmp_path / "ev.json"), "-o", str(tmp_path / "hc.pem"))
    assert_clean_error(cp, 6)
    assert "host key registered" in cp.stderr
    assert not (tmp_path / "hc.pem").exists()
    assert run_cli("hgs", "register-host", str(g), "--host", str(h), "--name", "h1").returncode == 0
    cp = run_cli("hgs", "attest", str(g), str(tmp_path / "ev.json"), "-o", str(tmp_path / "hc.pem"), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["checks"][1]["passed"] is True
    assert (tmp_path / "hc.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    (tmp_path / "bad.json").write_text("{")
    assert_clean_error(run_cli("hgs", "attest", str(g), str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.pem")), 3)
