"""The guardian value type and its certificate checks (usage, validity, chain, name).

The layer both :mod:`.metadata` (HGS metadata XML) and :mod:`.model` (folders, generation,
loading) build on; it imports neither, so the guardian package has no import cycle.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..errors import (
    FormatError,
    PolicyError,
    UsageError,
)
from ..signers import certs as _certs

_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")


@dataclass
class Guardian:
    """A guardian (an HGS fabric or the VM owner).

    ``source`` is ``generated`` (made here, keys held), ``imported`` (from HGS metadata XML, root
    trust decided at import) or ``certificates`` (public certificates given directly).
    """

    name: str
    signing_certificate: x509.Certificate
    encryption_certificate: x509.Certificate
    signing_key: _certs.PrivateKey | None = None
    encryption_key: _certs.PrivateKey | None = None
    other_signing_certificates: list[x509.Certificate] = field(default_factory=list)
    source: str = "generated"
    path: str | None = None
    #: (algorithm URI, value): the signing key's signature over the encryption certificate DER,
    #: as found in signed HGS metadata (needed to put a guardian without keys into a KP).
    encryption_signature: tuple[str, bytes] | None = None

    @property
    def has_private_keys(self) -> bool:
        """True when both private keys are loaded."""
        return self.signing_key is not None and self.encryption_key is not None

    @property
    def thumbprint(self) -> str:
        """SHA-1 thumbprint of the signing certificate (upper-case hex, Windows convention)."""
        return _certs.thumbprint(self.signing_certificate, "sha1")

    def matches(self, name_or_thumbprint: str) -> bool:
        """True when the argument is this guardian's name or a SHA-1/SHA-256 thumbprint of one of its certs."""
        t = name_or_thumbprint.strip().replace(":", "").upper()
        if name_or_thumbprint == self.name:
            return True
        for c in (self.signing_certificate, self.encryption_certificate):
            if t in (_certs.thumbprint(c, "sha1"), _certs.thumbprint(c, "sha256")):
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        """Public description (no key material)."""
        return {
            "name": self.name,
            "source": self.source,
            "has_private_keys": self.has_private_keys,
            "signing_certificate": describe_certificate(self.signing_certificate),
            "encryption_certificate": describe_certificate(self.encryption_certificate),
            "other_signing_certificates": [describe_certificate(c) for c in self.other_signing_certificates],
        }


def describe_certificate(cert: x509.Certificate) -> dict[str, Any]:
    """Subject, issuer, serial, validity, key type and thumbprints of a certificate."""
    pub = cert.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        key = f"RSA-{pub.key_size}"
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        key = f"EC-{pub.curve.name}"
    else:
        key = type(pub).__name__
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        usages = [
            n
            for n in ("digital_signature", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign")
            if getattr(ku, n)
        ]
    except x509.ExtensionNotFound:
        usages = ["(any)"]
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key": key,
        "key_usage": usages,
        "sha1": _certs.thumbprint(cert, "sha1"),
        "sha256": _certs.thumbprint(cert, "sha256"),
    }


# ------------------------------------------------------------------------------------------------
# Certificate checks
# ------------------------------------------------------------------------------------------------


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def check_usage(cert: x509.Certificate, role: str, where: str) -> None:
    """Refuse a certificate whose key type or KeyUsage does not fit ``role`` (signing|encryption)."""
    pub = cert.public_key()
    subj = cert.subject.rfc4514_string()
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise PolicyError(
                f"{role} certificate has a {pub.key_size}-bit RSA key", f"{where}: {subj}", "use RSA 2048 bits or more"
            )
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise PolicyError(
                f"{role} certificate uses curve {pub.curve.name}", f"{where}: {subj}", "use P-256 or P-384"
            )
    else:
        raise PolicyError(f"{role} certificate has an unsupported key type", f"{where}: {subj}", "use RSA or EC")
    ku = _key_usage(cert)
    if ku is None:
        return
    if role == "signing" and not ku.digital_signature:
        raise PolicyError(
            "wrong certificate usage: the signing certificate lacks digitalSignature",
            f"{where}: {subj}",
            "give the guardian's signing certificate",
        )
    if role == "encryption":
        need_ka = isinstance(pub, ec.EllipticCurvePublicKey)
        if need_ka and not ku.key_agreement:
            raise PolicyError(
                "wrong certificate usage: the EC encryption certificate lacks keyAgreement",
                f"{where}: {subj}",
                "give the guardian's encryption certificate",
            )
        if not need_ka and not ku.key_encipherment:
            raise PolicyError(
                "wrong certificate usage: the RSA encryption certificate lacks keyEncipherment",
                f"{where}: {subj}",
                "give the guardian's encryption certificate",
            )


def check_validity(
    cert: x509.Certificate, where: str, at: _dt.datetime | None = None, allow_expired: bool = False
) -> None:
    """Refuse an expired or not-yet-valid certificate unless ``allow_expired``."""
    now = at or _dt.datetime.now(_dt.UTC)
    if allow_expired:
        return
    subj = cert.subject.rfc4514_string()
    if now > cert.not_valid_after_utc:
        raise PolicyError(
            f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            f"{where}: {subj}",
            "renew it, or allow expired certificates to accept it anyway",
            code="cert.expired",
        )
    if now < cert.not_valid_before_utc:
        raise PolicyError(
            f"certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}",
            f"{where}: {subj}",
            "check the clock, or allow expired certificates",
            code="cert.not-yet-valid",
        )


def _is_self_issued(cert: x509.Certificate, where: str = "certificate") -> bool:
    try:
        return cert.issuer == cert.subject
    except ValueError as e:  # names are parsed lazily: a malformed subject/issuer fails here
        raise FormatError(
            f"malformed certificate name: {_first_line(e)}", where, "the certificate is damaged; give the original file"
        ) from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def check_certificate_parses(cert: x509.Certificate, what: str, where: str) -> None:
    """Force cryptography's lazy parsing of the names and public key: FormatError when damaged."""
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise FormatError(
            f"{what} is not a valid X.509 certificate: {_first_line(e)}",
            where,
            "the certificate is damaged; give the original file",
        ) from None


def check_chain(
    cert: x509.Certificate,
    where: str,
    extra: Sequence[x509.Certificate] = (),
    trust: Sequence[x509.Certificate] = (),
    allow_untrusted_root: bool = False,
    *,
    at: _dt.datetime | None = None,
    allow_expired: bool = False,
) -> list[x509.Certificate]:
    """Validate ``cert``'s chain up to a root in ``trust`` (:func:`templatetool.pki.verify_chain`).

    Every issuer must be a CA (basicConstraints, keyCertSign) valid at ``at`` (now) unless
    ``allow_expired``; a root outside ``trust`` is refused unless ``allow_untrusted_root`` (like
    ``-AllowUntrustedRoot``; the rest of the chain is still validated). Returns the path.
    A bad certificate signature is an IntegrityError, any other refusal a PolicyError.
    """
    from ..pki import verify_chain

    return verify_chain(
        cert,
        list(extra),
        list(trust),
        at=at,
        allow_untrusted_root=allow_untrusted_root,
        allow_expired=allow_expired,
        where=where,
    ).chain


def check_guardian(
    g: Guardian,
    where: str | None = None,
    *,
    at: _dt.datetime | None = None,
    allow_expired: bool = False,
    allow_untrusted_root: bool = False,
    trust: Sequence[x509.Certificate] = (),
) -> None:
    """Usage, validity and chain checks on both certificates of a guardian.

    Root trust is only enforced for guardians given as bare certificates or metadata
    (``source`` ``certificates``/``metadata``); generated guardians are self-trusted, and
    imported folders had their root accepted at import time.
    """
    w = where or f"guardian {g.name!r}"
    check_usage(g.signing_certificate, "signing", w)
    check_usage(g.encryption_certificate, "encryption", w)
    for c in (g.signing_certificate, g.encryption_certificate):
        check_validity(c, w, at, allow_expired)
    enforce_root = g.source not in ("generated", "imported")
    check_chain(
        g.signing_certificate,
        w,
        g.other_signing_certificates,
        trust,
        allow_untrusted_root or not enforce_root,
        at=at,
        allow_expired=allow_expired,
    )
    check_chain(
        g.encryption_certificate,
        w,
        [g.signing_certificate, *g.other_signing_certificates],
        trust,
        allow_untrusted_root or not enforce_root,
        at=at,
        allow_expired=allow_expired,
    )


def validate_name(name: str) -> str:
    """Check a guardian name (1-64 printable characters)."""
    if not _NAME_RE.match(name or "") or name.strip() != name:
        raise UsageError(
            f"bad guardian name {name!r}", hint="use 1-64 printable characters, no leading/trailing spaces"
        )
    return name
