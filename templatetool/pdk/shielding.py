"""Shielding data (PDK): create, read/verify, open the secret part, check templates (docs/formats/pdk.md).

A ``.pdk`` file is a DER CMS SignedData (signed by the owner guardian's signing key, id-data
content, via ``cms.signed``). Its content is the canonical-JSON clear document: owner and guardian
certificates, volume ID qualifiers, policy, and the secret part as CMS AuthEnvelopedData
(AES-256-GCM; ``cms.enveloped``) to the owner's and every guardian's encryption certificate.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import algos, cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..canonical import canonical_json, load_canonical
from ..catalog.qualifier import VolumeIdQualifier
from ..cms.enveloped import (
    RecipientKey,
    envelope,
    list_recipients,
    open_envelope,
    recipient_ids,
)
from ..cms.signed import sign_data, verify_signed_data
from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    TemplateToolError,
    UsageError,
)
from ..guardian import sigalg
from ..guardian.model import (
    Guardian,
    check_chain,
    check_guardian,
    check_usage,
    check_validity,
    describe_certificate,
)
from ..signers.base import KeySigner
from ..signers.certs import thumbprint
from .document import (
    PDK_FORMAT,
    PDK_VERSION,
    POLICIES,
    SecretPart,
    b64,
    cert_b64,
    cert_from_b64,
    unb64,
)

MAX_PDK_SIZE = 16 << 20


class GuardianSigner(KeySigner):
    """A guardian holding its signing key, as a :class:`~templatetool.signers.base.Signer`."""

    def __init__(self, g: Guardian) -> None:
        if g.signing_key is None:
            raise CredentialError(
                f"guardian {g.name!r} has no private signing key here",
                g.path,
                "give the owner guardian folder that holds its keys",
            )
        self._g = g
        super().__init__(g.signing_key, g.signing_certificate, list(g.other_signing_certificates))

    def describe(self) -> str:
        """The guardian's signing certificate subject."""
        return f"{self.certificate.subject.rfc4514_string()} (guardian {self._g.name})"


@dataclass
class PdkEntry:
    """A guardian as recorded in a PDK (certificates only)."""

    name: str
    signing_certificate: x509.Certificate
    encryption_certificate: x509.Certificate
    #: (algorithm URI, value): the guardian's signing key over its encryption certificate DER, as a
    #: [MS-KPS] wrapping needs it (so a KP can be made from the PDK alone); None when unknown.
    encryption_signature: tuple[str, bytes] | None = None

    @classmethod
    def from_guardian(cls, g: Guardian) -> PdkEntry:
        sig = g.encryption_signature
        if g.signing_key is not None:
            sig = sigalg.sign_bytes(g.signing_key, _der(g.encryption_certificate))
        return cls(g.name, g.signing_certificate, g.encryption_certificate, sig)

    def to_doc(self) -> dict[str, Any]:
        sig = (
            None
            if self.encryption_signature is None
            else {"algorithm": self.encryption_signature[0], "value": b64(self.encryption_signature[1])}
        )
        return {
            "name": self.name,
            "signing_certificate": cert_b64(self.signing_certificate),
            "encryption_certificate": cert_b64(self.encryption_certificate),
            "encryption_certificate_signature": sig,
        }

    @classmethod
    def from_doc(cls, d: Any, what: str) -> PdkEntry:
        if not isinstance(d, dict) or set(d) != {
            "name",
            "signing_certificate",
            "encryption_certificate",
            "encryption_certificate_signature",
        }:
            raise FormatError(f"bad {what} entry in the PDK")
        sig = d["encryption_certificate_signature"]
        if sig is not None:
            if not isinstance(sig, dict) or set(sig) != {"algorithm", "value"} or not isinstance(sig["algorithm"], str):
                raise FormatError(f"bad {what} encryption certificate signature in the PDK")
            sig = (sig["algorithm"], unb64(sig["value"], f"{what} encryption certificate signature"))
        return cls(
            str(d["name"]),
            cert_from_b64(d["signing_certificate"], f"{what} signing certificate"),
            cert_from_b64(d["encryption_certificate"], f"{what} encryption certificate"),
            sig,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "signing_certificate": describe_certificate(self.signing_certificate),
            "encryption_certificate": describe_certificate(self.encryption_certificate),
        }


@dataclass
class PdkInfo:
    """A verified PDK (clear part); the secret part stays sealed until :func:`open_pdk_secret`."""

    created: str
    policy: str
    owner: PdkEntry
    guardians: list[PdkEntry]
    qualifiers: list[VolumeIdQualifier]
    secret_envelope: bytes
    signing_time: _dt.datetime | None
    owner_trust: str
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PDK_FORMAT,
            "version": PDK_VERSION,
            "created": self.created,
            "policy": self.policy,
            "owner": self.owner.to_json(),
            "guardians": [g.to_json() for g in self.guardians],
            "volume_id_qualifiers": [q.to_json() for q in self.qualifiers],
            "secret_part": {
                "cms": "AuthEnvelopedData (AES-256-GCM)",
                "size": len(self.secret_envelope),
                "recipients": [r.to_json() for r in list_recipients(self.secret_envelope)],
            },
            "signature": {
                "signer": self.owner.signing_certificate.subject.rfc4514_string(),
                "signing_time": self.signing_time.isoformat() if self.signing_time else None,
                "verified": True,
                "owner_trust": self.owner_trust,
            },
            "warnings": self.warnings,
        }


def _der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def create_pdk(
    owner: Guardian,
    guardians: list[Guardian],
    qualifiers: list[VolumeIdQualifier],
    secret: SecretPart,
    policy: str = "shielded",
    *,
    allow_expired: bool = False,
    allow_untrusted_root: bool = False,
    trust: Sequence[x509.Certificate] = (),
    created: _dt.datetime | None = None,
) -> tuple[bytes, list[str]]:
    """Build and sign a PDK; returns (DER bytes, warnings).

    The owner needs its private signing key. Every guardian certificate is checked (usage,
    validity unless ``allow_expired``, root trust for bare/metadata guardians unless
    ``allow_untrusted_root``). Raises UsageError for bad policy/limits (384 KB on other files).
    """
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}", hint="use shielded or encryption-supported")
    secret.validate()
    signer = GuardianSigner(owner)
    check_guardian(owner, "owner", allow_expired=allow_expired, allow_untrusted_root=allow_untrusted_root, trust=trust)
    seen = {_der(owner.encryption_certificate)}
    for g in guardians:
        check_guardian(g, allow_expired=allow_expired, allow_untrusted_root=allow_untrusted_root, trust=trust)
        if _der(g.encryption_certificate) in seen:
            raise UsageError(f"guardian {g.name!r} is given twice (or is the owner)", hint="list each guardian once")
        seen.add(_der(g.encryption_certificate))
    warnings: list[str] = []
    if not guardians:
        warnings.append("no guardian given: only the owner can open this PDK (no fabric can run the VM)")
    if not qualifiers:
        warnings.append("no volume ID qualifier: no template disk is trusted by this PDK")
    if policy == "shielded" and secret.answer_file is None:
        warnings.append("policy 'shielded' without an answer file: the VM cannot be specialized")
    missing = secret.placeholders_without_values()
    if missing:
        warnings.append(
            "the answer file uses substitution strings without values: "
            + ", ".join(missing)
            + " (specialization would fail)"
        )
    env = envelope(secret.to_bytes(), [owner.encryption_certificate] + [g.encryption_certificate for g in guardians])
    when = (created or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC)
    doc = {
        "format": PDK_FORMAT,
        "version": PDK_VERSION,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "policy": policy,
        "owner": PdkEntry.from_guardian(owner).to_doc(),
        "guardians": [PdkEntry.from_guardian(g).to_doc() for g in guardians],
        "volume_id_qualifiers": [q.to_json() for q in qualifiers],
        "secret_part": b64(env),
    }
    return sign_data(canonical_json(doc), signer), warnings


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _strict_shape(der: bytes, where: str) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """Refuse any SignedData byte that the signature does not cover and that differs from what
    ``cms.signed.sign_data`` writes (versions, algorithm identifiers, extra fields, non-DER)."""
    try:
        ci = cms.ContentInfo.load(der, strict=True)
        if ci["content_type"].native != "signed_data":
            raise FormatError("not a CMS SignedData", where, "a .pdk file is DER CMS SignedData")
        sd = ci["content"]
        if ci.dump(force=True) != der:
            raise IntegrityError("the PDK is not in DER form", where, "it was altered after signing")
        sis = list(sd["signer_infos"])
        certs = (
            [x509.load_der_x509_certificate(c.chosen.dump()) for c in sd["certificates"]]
            if sd["certificates"].native is not None
            else []
        )
        for c in certs:
            c.public_key()  # parsed lazily: a damaged key must fail here
        problems = []
        signer: x509.Certificate | None = None
        if sd["version"].native != "v1":
            problems.append("SignedData version")
        if sd["encap_content_info"]["content_type"].native != "data":
            problems.append("content type")
        if sd["crls"].native is not None:
            problems.append("CRLs present")
        if len(sis) != 1:
            problems.append("signer count")
        else:
            si = sis[0]
            dig = si["digest_algorithm"]["algorithm"].native
            if [d.dump() for d in sd["digest_algorithms"]] != [algos.DigestAlgorithm({"algorithm": dig}).dump()]:
                problems.append("digest algorithm set")
            if si["digest_algorithm"].dump() != algos.DigestAlgorithm({"algorithm": dig}).dump():
                problems.append("digest algorithm")
            if si["version"].native != "v1" or si["sid"].name != "issuer_and_serial_number":
                problems.append("SignerInfo version")
            if si["unsigned_attrs"].native is not None:
                problems.append("unsigned attributes")
            # DER sorts the SET OF certificates: find the signer by issuer and serial, not position
            sid = si["sid"].chosen if si["sid"].name == "issuer_and_serial_number" else None
            signer = (
                None
                if sid is None
                else next(
                    (
                        c
                        for c in certs
                        if c.serial_number == sid["serial_number"].native
                        and c.issuer.public_bytes() == sid["issuer"].dump()
                    ),
                    None,
                )
            )
            if signer is None:
                problems.append("no signer certificate")
            else:
                pub = signer.public_key()
                if isinstance(pub, rsa.RSAPublicKey):
                    expect = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}).dump()
                elif isinstance(pub, ec.EllipticCurvePublicKey):
                    expect = algos.SignedDigestAlgorithm({"algorithm": f"{dig}_ecdsa"}).dump()
                else:
                    expect = b""
                if si["signature_algorithm"].dump() != expect:
                    problems.append("signature algorithm")
        if problems or signer is None:  # (no signer always adds a problem)
            raise IntegrityError(
                f"unexpected CMS fields in the PDK ({', '.join(problems)})",
                where,
                "it was altered after signing or not written by templatetool",
            )
        return signer, [c for c in certs if c is not signer]
    except TemplateToolError:
        raise
    except Exception as e:
        raise FormatError(f"malformed CMS in the PDK: {type(e).__name__}: {e}", where) from None


def read_pdk(
    der: bytes,
    where: str = "PDK",
    *,
    allow_expired: bool = False,
    trust: list[x509.Certificate] | None = None,
    owner_certificate: x509.Certificate | None = None,
    at: _dt.datetime | None = None,
) -> PdkInfo:
    """Verify a PDK and return its clear part.

    Checks: strict DER/CMS shape; the owner's CMS signature (``cms.signed``); that the signer is
    the owner recorded in the document; every certificate's usage, validity (unless
    ``allow_expired``) and self-signature; that the envelope's recipients are exactly the owner
    and the guardians. The owner is *pinned* when ``owner_certificate`` or ``trust`` is given
    (PolicyError otherwise mismatching); else ``owner_trust`` says it was not pinned.
    """
    if len(der) > MAX_PDK_SIZE:
        raise FormatError("file too large for a PDK", where)
    signer_cert, chain = _strict_shape(der, where)
    now = at or _dt.datetime.now(_dt.UTC)
    check_at = now
    if allow_expired:
        check_at = min(max(now, signer_cert.not_valid_before_utc), signer_cert.not_valid_after_utc)
    info = verify_signed_data(der, at=check_at)
    try:
        doc = load_canonical(info.content, "PDK document")
    except FormatError as e:
        raise FormatError(e.what, where) from None
    try:
        if doc["format"] != PDK_FORMAT:
            raise FormatError(f"not a PDK document ({doc['format']!r})", where)
        if doc["version"] != PDK_VERSION:
            raise FormatError(f"unsupported PDK version {doc['version']!r}", where, "upgrade templatetool")
        if set(doc) != {
            "format",
            "version",
            "created",
            "policy",
            "owner",
            "guardians",
            "volume_id_qualifiers",
            "secret_part",
        }:
            raise FormatError("unexpected fields in the PDK document", where)
        policy = doc["policy"]
        if policy not in POLICIES:
            raise FormatError(f"unknown policy {policy!r}", where)
        owner = PdkEntry.from_doc(doc["owner"], "owner")
        guardians = [PdkEntry.from_doc(g, "guardian") for g in doc["guardians"]]
        quals = [VolumeIdQualifier.from_json(q) for q in doc["volume_id_qualifiers"]]
        env = unb64(doc["secret_part"], "secret part")
        created = str(doc["created"])
    except FormatError as e:
        raise FormatError(e.what, where, e.hint) from None
    except (KeyError, TypeError) as e:
        raise FormatError(f"incomplete PDK document ({e})", where) from None
    if _der(info.signer_cert) != _der(owner.signing_certificate) or _der(signer_cert) != _der(
        owner.signing_certificate
    ):
        raise IntegrityError("the PDK is not signed by the owner it names", where)
    for ent in [owner, *guardians]:
        w = f"{where}: {'owner' if ent is owner else 'guardian'} {ent.name!r}"
        check_usage(ent.signing_certificate, "signing", w)
        check_usage(ent.encryption_certificate, "encryption", w)
        for c in (ent.signing_certificate, ent.encryption_certificate):
            check_validity(c, w, now, allow_expired)
        # signature of each certificate where its issuer is known (self-signed: always)
        check_chain(
            ent.signing_certificate, w, chain, (), allow_untrusted_root=True, at=now, allow_expired=allow_expired
        )
        check_chain(
            ent.encryption_certificate,
            w,
            [ent.signing_certificate, *chain],
            (),
            allow_untrusted_root=True,
            at=now,
            allow_expired=allow_expired,
        )
        if ent.encryption_signature is not None:
            sigalg.verify_bytes(
                ent.signing_certificate.public_key(),
                *ent.encryption_signature,
                _der(ent.encryption_certificate),
                "encryption certificate signature",
                w,
            )
    owner_trust = "not pinned (pin the owner with `pdk verify --owner` or `pdk verify --trust`)"
    if owner_certificate is not None:
        if _der(owner_certificate) != _der(owner.signing_certificate):
            raise IntegrityError("the PDK is signed by another owner", where, "check which owner made it")
        owner_trust = "pinned (owner certificate matches)"
    elif trust:
        check_chain(
            owner.signing_certificate,
            f"{where}: owner",
            chain,
            list(trust),
            allow_untrusted_root=False,
            at=now,
            allow_expired=allow_expired,
        )
        owner_trust = "trusted (chains to --trust)"
    expected = sorted(
        (c.issuer.public_bytes(), c.serial_number)
        for c in [owner.encryption_certificate] + [g.encryption_certificate for g in guardians]
    )
    got = recipient_ids(env, f"{where}: secret part")
    if sorted(got) != expected:
        raise IntegrityError("the secret part's recipients differ from the owner and guardians", where)
    return PdkInfo(created, policy, owner, guardians, quals, env, info.signing_time, owner_trust)


def open_pdk_secret(info: PdkInfo, key: RecipientKey, cert: x509.Certificate, where: str = "PDK") -> SecretPart:
    """Decrypt the secret part with a recipient's private key and certificate."""
    data = open_envelope(info.secret_envelope, key, cert, where=f"{where}: secret part")
    try:
        return SecretPart.from_bytes(data)
    except FormatError as e:
        raise FormatError(e.what, f"{where}: secret part") from None


def check_template(
    info: PdkInfo, vsc_der: bytes, where: str = "template", *, trust: list[x509.Certificate] | None = None
) -> dict[str, Any]:
    """Does a signed catalog satisfy one of the PDK's volume ID qualifiers? Returns a report.

    The catalog signature is verified (``catalog.vsc.open_vsc``); matching follows Microsoft's
    rule (name and signer must match exactly before the version rule counts).
    """
    from ..catalog.vsc import open_vsc

    vi = open_vsc(vsc_der, trust=trust)
    results: list[dict[str, Any]] = []  # JSON report rows
    ok = False
    for q in info.qualifiers:
        m, reason = q.matches(vi)
        results.append({"qualifier": q.to_json(), "matches": m, "reason": reason})
        ok = ok or m
    return {
        "template": {
            "name": vi.name,
            "version": ".".join(str(x) for x in vi.version),
            "signer": vi.signer_cert.subject.rfc4514_string(),
            "signer_thumbprint": vi.signer_thumbprint,
        },
        "qualified": ok,
        "reason": next((r["reason"] for r in results if r["matches"]), None)
        if ok
        else ("; ".join(r["reason"] for r in results) if results else "the PDK has no volume ID qualifier"),
        "qualifiers": results,
    }


def thumbprints(cert: x509.Certificate) -> dict[str, str]:
    return {"sha1": thumbprint(cert, "sha1"), "sha256": thumbprint(cert, "sha256")}
