"""Attestation policy, evidence checking and health certificates."""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..atomic import write_bytes_atomic
from ..errors import FormatError, IntegrityError, NotFoundError, PolicyError, UsageError
from ..guardian.sigalg import verify_bytes
from .host import EVIDENCE_FORMAT, MAX_EVIDENCE, _canonical, load_public, pem_public

POLICY_FILE = "attestation.json"
POLICY_FORMAT = "templatetool-attestation-policy"
#: Health certificates live 8 hours by default, like HGS (at most 30 days).
DEFAULT_HOURS = 8
MAX_HOURS = 24 * 30
#: Extended key usage marking our health certificates (a UUID-derived OID, ITU-T X.667 arc 2.25).
HEALTH_EKU = x509.ObjectIdentifier("2.25.207977316315935096287411402925826727105")
#: Default PCRs of a TPM baseline (firmware, boot manager, Secure Boot policy, BitLocker access control).
DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 7, 11)


@dataclass
class HealthCheck:
    """One attestation check and its outcome."""

    name: str
    passed: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class AttestationPolicy:
    """What a guardian trusts: host keys and/or TPM hosts with a PCR baseline and CI policies."""

    host_keys: dict[str, str] = field(default_factory=dict)  # name -> PEM public key
    tpm_hosts: dict[str, str] = field(default_factory=dict)  # name -> EK public PEM
    pcr_bank: str = "sha256"
    pcr_baseline: dict[int, str] = field(default_factory=dict)  # pcr -> hex
    ci_policies: list[str] = field(default_factory=list)  # allowed CI policy hashes (hex)
    health_hours: int = DEFAULT_HOURS

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def load(cls, guardian_dir: str | os.PathLike[str]) -> AttestationPolicy:
        """Load ``attestation.json`` from a guardian folder (an empty policy when absent)."""
        p = Path(guardian_dir) / POLICY_FILE
        if not p.exists():
            return cls()
        try:
            d = json.loads(p.read_text())
            if d.get("format") != POLICY_FORMAT:
                raise ValueError("format")
            pol = cls(
                host_keys=dict(d.get("host_keys", {})),
                tpm_hosts=dict(d.get("tpm_hosts", {})),
                pcr_bank=str(d.get("pcr_bank", "sha256")),
                pcr_baseline={int(k): str(v) for k, v in d.get("pcr_baseline", {}).items()},
                ci_policies=[str(x) for x in d.get("ci_policies", [])],
                health_hours=int(d.get("health_hours", DEFAULT_HOURS)),
            )
            if not 1 <= pol.health_hours <= MAX_HOURS:
                raise ValueError("health_hours")
            if any(not 0 <= k < 24 for k in pol.pcr_baseline):
                raise ValueError("pcr")
            return pol
        except (ValueError, TypeError, AttributeError, RecursionError, json.JSONDecodeError):
            raise FormatError("attestation policy is malformed", str(p), "recreate it with `hgs` commands") from None

    def save(self, guardian_dir: str | os.PathLike[str]) -> Path:
        """Write ``attestation.json`` atomically."""
        p = Path(guardian_dir) / POLICY_FILE
        write_bytes_atomic(p, json.dumps(self.to_json(), indent=2).encode())
        return p

    def to_json(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "version": 1,
            "host_keys": self.host_keys,
            "tpm_hosts": self.tpm_hosts,
            "pcr_bank": self.pcr_bank,
            "pcr_baseline": {str(k): v for k, v in sorted(self.pcr_baseline.items())},
            "ci_policies": self.ci_policies,
            "health_hours": self.health_hours,
        }

    # -- management ------------------------------------------------------------------------
    def add_host_key(self, name: str, pem: str) -> None:
        """Register a host key (host-key attestation)."""
        load_public(pem, "host key", name)
        self.host_keys[name] = pem

    def add_tpm_host(self, name: str, ek_pem: str) -> None:
        """Register a TPM host by its EK public key (TPM attestation)."""
        load_public(ek_pem, "EK public key", name)
        self.tpm_hosts[name] = ek_pem

    def set_baseline_from_log(self, tcg_log: bytes, pcrs: tuple[int, ...] = DEFAULT_PCRS, bank: str = "sha256") -> None:
        """Set the PCR baseline to the values a reference TCG log implies."""
        from ..tpm.algs import check_pcrs
        from ..tpm.eventlog import replay_log

        pcrs = tuple(check_pcrs(pcrs))  # 0..23: a UsageError, never a KeyError below
        rep = replay_log(tcg_log)
        if bank not in rep.values_by_bank:
            raise PolicyError(f"reference log has no {bank} bank", hint=f"banks: {', '.join(rep.values_by_bank)}")
        self.pcr_bank = bank
        self.pcr_baseline = {i: rep.values_by_bank[bank][i].hex() for i in pcrs}

    def allow_ci_policy(self, digest_hex: str) -> None:
        """Allow a code-integrity policy hash."""
        try:
            bytes.fromhex(digest_hex)
        except ValueError:
            raise UsageError(f"not a hex hash: {digest_hex!r}") from None
        self.ci_policies.append(digest_hex.lower())


def _parse_evidence(data: bytes, where: str) -> tuple[dict[str, Any], str, bytes]:
    if len(data) > MAX_EVIDENCE:
        raise FormatError("evidence file too large", where)
    try:
        doc = json.loads(data)
        body = doc["evidence"]
        alg = str(doc["signature_algorithm"])
        sig = base64.b64decode(doc["signature"], validate=True)
        if not isinstance(body, dict) or body.get("format") != EVIDENCE_FORMAT or body.get("version") != 1:
            raise ValueError("format")
        for k in ("host", "created", "host_key", "encryption_key"):
            if not isinstance(body.get(k), str):
                raise ValueError(k)
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise FormatError("host evidence is malformed", where, "produce it with `host evidence`") from None
    return body, alg, sig


def _issuer_public(cert: x509.Certificate) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The attestation signer's public key (RSA or EC, as init_attestation makes it)."""
    pub = cert.public_key()
    if not isinstance(pub, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise FormatError("the attestation signer key must be RSA or EC", "attestation signer")
    return pub


def _pub_equal(a: Any, b: Any) -> bool:
    f = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(serialization.Encoding.DER, f) == b.public_bytes(serialization.Encoding.DER, f))


def check_evidence(
    policy: AttestationPolicy, evidence: bytes, where: str = "host evidence"
) -> tuple[list[HealthCheck], dict[str, Any]]:
    """Run every attestation check; returns the checks (each passed or not) and the evidence body."""
    body, alg, sig = _parse_evidence(evidence, where)
    checks: list[HealthCheck] = []
    host_key = load_public(body["host_key"], "host key", where)
    try:
        verify_bytes(host_key, alg, sig, _canonical(body), "evidence signature", where)
        checks.append(HealthCheck("evidence signature", True, "signed by the host key it presents"))
    except IntegrityError as e:
        checks.append(HealthCheck("evidence signature", False, e.what))
        return checks, body
    tpm = body.get("tpm")
    if tpm is None:
        registered = [n for n, pem in policy.host_keys.items() if _pub_equal(load_public(pem, "host key", n), host_key)]
        checks.append(
            HealthCheck(
                "host key registered",
                bool(registered),
                f"registered as {registered[0]!r}"
                if registered
                else f"host {body['host']!r} presents a key this guardian has not registered",
            )
        )
        return checks, body
    # TPM mode
    try:
        ek = load_public(str(tpm.get("ek_public") or ""), "EK public key", where)
        names = [n for n, pem in policy.tpm_hosts.items() if _pub_equal(load_public(pem, "EK", n), ek)]
        checks.append(
            HealthCheck(
                "TPM endorsement key registered",
                bool(names),
                f"registered as {names[0]!r}" if names else "EK not registered with this guardian",
            )
        )
    except FormatError as e:
        checks.append(HealthCheck("TPM endorsement key registered", False, e.what))
    from ..tpm.eventlog import replay_log

    try:
        rep = replay_log(base64.b64decode(str(tpm.get("tcg_log", "")), validate=True))
        values = rep.values_by_bank.get(policy.pcr_bank)
        if not policy.pcr_baseline:
            checks.append(HealthCheck("PCR baseline", False, "this guardian has no PCR baseline configured"))
        elif values is None:
            checks.append(HealthCheck("PCR baseline", False, f"log has no {policy.pcr_bank} bank"))
        else:
            diff = [i for i, v in sorted(policy.pcr_baseline.items()) if values[i].hex() != v.lower()]
            checks.append(
                HealthCheck(
                    "PCR baseline",
                    not diff,
                    "replayed PCRs match the baseline"
                    if not diff
                    else f"replayed {policy.pcr_bank} PCR(s) {', '.join(map(str, diff))} differ from the baseline",
                )
            )
    except (FormatError, binascii.Error, ValueError) as e:
        checks.append(HealthCheck("PCR baseline", False, f"TCG log unusable: {e}"))
    ci = str(tpm.get("ci_policy_hash") or "").lower()
    ci_ok = not policy.ci_policies or ci in policy.ci_policies
    checks.append(
        HealthCheck(
            "code integrity policy",
            ci_ok,
            ("allowed" if policy.ci_policies else "no CI policy required")
            if ci_ok
            else f"CI policy {ci or '(none)'} is not allowed",
        )
    )
    return checks, body


def attest(
    policy: AttestationPolicy,
    evidence: bytes,
    issuer_key: Any,
    issuer_cert: x509.Certificate,
    *,
    where: str = "host evidence",
    at: _dt.datetime | None = None,
) -> tuple[x509.Certificate, list[HealthCheck]]:
    """Check evidence and, when every check passes, issue a health certificate for the host's encryption key.

    ``issuer_key``/``issuer_cert`` are the guardian's attestation signer (a CA certificate, see
    :func:`init_attestation`), so health certificates verify with standard X.509 tools.

    Raises PolicyError naming the first failed check (all checks are in the error's hint).
    """
    checks, body = check_evidence(policy, evidence, where)
    failed = [c for c in checks if not c.passed]
    if failed:
        raise PolicyError(
            f"attestation failed: {failed[0].name}: {failed[0].detail}",
            where,
            "; ".join(f"{c.name}: {'ok' if c.passed else 'FAILED'}" for c in checks),
        )
    now = at or _dt.datetime.now(_dt.UTC)
    host_enc = load_public(body["encryption_key"], "host encryption key", where)
    ku_enc = isinstance(host_enc, rsa.RSAPublicKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Health {body['host']}"[:64])]))
        .issuer_name(issuer_cert.subject)
        .public_key(host_enc)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(hours=policy.health_hours))
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=ku_enc,
                data_encipherment=False,
                key_agreement=not ku_enc,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([HEALTH_EKU]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(_issuer_public(issuer_cert)), critical=False)
        .sign(
            issuer_key,
            hashes.SHA384()
            if isinstance(issuer_key, ec.EllipticCurvePrivateKey) and issuer_key.curve.key_size >= 384
            else hashes.SHA256(),
        )
    )
    return cert, checks


def verify_health_certificate(
    cert: x509.Certificate,
    issuer_cert: x509.Certificate,
    *,
    at: _dt.datetime | None = None,
    where: str = "health certificate",
) -> None:
    """Check a health certificate: issued by this guardian's attestation CA (any signature algorithm
    the PKI module accepts), our EKU, and fresh at ``at`` (now). PolicyError / IntegrityError."""
    if cert.issuer != issuer_cert.subject:
        raise PolicyError(
            "health certificate was not issued by this guardian", where, "attest again with this guardian"
        )
    from ..pki import verify_chain

    verify_chain(cert, [], [issuer_cert], at=at, eku=HEALTH_EKU, where=where, what="health certificate")


ATTESTATION_KEY = "attestation-signer.key.pem"
ATTESTATION_CERT = "attestation-signer.pem"


def init_attestation(guardian_dir: str | os.PathLike[str], key_kind: str = "ec-p384") -> x509.Certificate:
    """Create the guardian's attestation signer (CA key 0600 + certificate) if it does not exist yet."""
    from ..signers.certs import ca_certificate, new_key

    d = Path(guardian_dir)
    if (d / ATTESTATION_CERT).exists():
        return load_attestation(d)[1]
    d.mkdir(parents=True, exist_ok=True)
    key = new_key(key_kind)
    cert = ca_certificate(f"CN=Attestation signer {d.name}"[:64], key)
    write_bytes_atomic(
        d / ATTESTATION_KEY,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600,
    )
    write_bytes_atomic(d / ATTESTATION_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def load_attestation(guardian_dir: str | os.PathLike[str]) -> tuple[Any, x509.Certificate]:
    """The attestation signer's (private key, certificate) from a guardian folder."""
    d = Path(guardian_dir)
    try:
        cert = x509.load_pem_x509_certificate((d / ATTESTATION_CERT).read_bytes())
        key = serialization.load_pem_private_key((d / ATTESTATION_KEY).read_bytes(), None)
    except FileNotFoundError:
        raise NotFoundError(
            "guardian has no attestation signer", str(d), "run `hgs init` on the guardian folder"
        ) from None
    except ValueError:
        raise FormatError("attestation signer files are corrupt", str(d)) from None
    return key, cert


def load_health_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read a PEM or DER health certificate."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError("health certificate not found", str(p)) from None
    try:
        return x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError:
        raise FormatError("not a certificate", str(p)) from None


def health_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


__all__ = [
    "AttestationPolicy",
    "HealthCheck",
    "attest",
    "check_evidence",
    "health_fingerprint",
    "init_attestation",
    "load_attestation",
    "load_health_certificate",
    "pem_public",
    "verify_health_certificate",
]
