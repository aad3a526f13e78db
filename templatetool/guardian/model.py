"""Guardians: a name, a signing certificate and an encryption certificate (+ private keys when ours).

On disk a guardian is a folder::

    guardian.json      metadata (format "templatetool-guardian", version 1)
    signing.pem        signing certificate (PEM)
    encryption.pem     encryption certificate (PEM)
    signing.pfx        signing key + certificate (PKCS#12, 0600) — only for our own guardians
    encryption.pfx     encryption key + certificate (PKCS#12, 0600) — only for our own guardians

``generate_guardian`` makes a self-signed pair like ``New-HgsGuardian -GenerateCertificates``
(subjects ``CN=Shielded VM Signing Certificate (NAME)`` / ``... Encryption Certificate (NAME)``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..atomic import write_bytes_atomic
from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    NotFoundError,
    PolicyError,
    ResourceError,
    UsageError,
)
from ..secrets import env_or_prompt
from ..signers import certs as _certs
from ..signers.base import Secret, resolve_secret

FORMAT = "templatetool-guardian"
FORMAT_VERSION = 1
GUARDIAN_KEY_KINDS = ("rsa3072", "rsa2048", "rsa4096", "ec-p256", "ec-p384")
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
        usages = [n for n in ("digital_signature", "key_encipherment", "data_encipherment", "key_agreement",
                              "key_cert_sign") if getattr(ku, n)]
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
            raise PolicyError(f"{role} certificate has a {pub.key_size}-bit RSA key", f"{where}: {subj}",
                              "use RSA 2048 bits or more")
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise PolicyError(f"{role} certificate uses curve {pub.curve.name}", f"{where}: {subj}", "use P-256 or P-384")
    else:
        raise PolicyError(f"{role} certificate has an unsupported key type", f"{where}: {subj}", "use RSA or EC")
    ku = _key_usage(cert)
    if ku is None:
        return
    if role == "signing" and not ku.digital_signature:
        raise PolicyError("wrong certificate usage: the signing certificate lacks digitalSignature",
                          f"{where}: {subj}", "give the guardian's signing certificate")
    if role == "encryption":
        need_ka = isinstance(pub, ec.EllipticCurvePublicKey)
        if need_ka and not ku.key_agreement:
            raise PolicyError("wrong certificate usage: the EC encryption certificate lacks keyAgreement",
                              f"{where}: {subj}", "give the guardian's encryption certificate")
        if not need_ka and not ku.key_encipherment:
            raise PolicyError("wrong certificate usage: the RSA encryption certificate lacks keyEncipherment",
                              f"{where}: {subj}", "give the guardian's encryption certificate")


def check_validity(cert: x509.Certificate, where: str, at: _dt.datetime | None = None,
                   allow_expired: bool = False) -> None:
    """Refuse an expired or not-yet-valid certificate unless ``allow_expired``."""
    now = at or _dt.datetime.now(_dt.UTC)
    if allow_expired:
        return
    subj = cert.subject.rfc4514_string()
    if now > cert.not_valid_after_utc:
        raise PolicyError(f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}", f"{where}: {subj}",
                          "renew it, or allow expired certificates to accept it anyway", code="cert.expired")
    if now < cert.not_valid_before_utc:
        raise PolicyError(f"certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d}", f"{where}: {subj}",
                          "check the clock, or allow expired certificates", code="cert.not-yet-valid")


def _is_self_issued(cert: x509.Certificate, where: str = "certificate") -> bool:
    try:
        return cert.issuer == cert.subject
    except ValueError as e:  # names are parsed lazily: a malformed subject/issuer fails here
        raise FormatError(f"malformed certificate name: {_first_line(e)}", where,
                          "the certificate is damaged; give the original file") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def check_certificate_parses(cert: x509.Certificate, what: str, where: str) -> None:
    """Force cryptography's lazy parsing of the names and public key: FormatError when damaged."""
    try:
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise FormatError(f"{what} is not a valid X.509 certificate: {_first_line(e)}", where,
                          "the certificate is damaged; give the original file") from None


def check_chain(cert: x509.Certificate, where: str, extra: list[x509.Certificate] = (),
                trust: list[x509.Certificate] = (), allow_untrusted_root: bool = False, *,
                at: _dt.datetime | None = None, allow_expired: bool = False) -> list[x509.Certificate]:
    """Validate ``cert``'s chain up to a root in ``trust`` (:func:`templatetool.pki.verify_chain`).

    Every issuer must be a CA (basicConstraints, keyCertSign) valid at ``at`` (now) unless
    ``allow_expired``; a root outside ``trust`` is refused unless ``allow_untrusted_root`` (like
    ``-AllowUntrustedRoot``; the rest of the chain is still validated). Returns the path.
    A bad certificate signature is an IntegrityError, any other refusal a PolicyError.
    """
    from ..pki import verify_chain

    return verify_chain(cert, list(extra), list(trust), at=at, allow_untrusted_root=allow_untrusted_root,
                        allow_expired=allow_expired, where=where).chain


def check_guardian(g: Guardian, where: str | None = None, *, at: _dt.datetime | None = None,
                   allow_expired: bool = False, allow_untrusted_root: bool = False,
                   trust: list[x509.Certificate] = ()) -> None:
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
    check_chain(g.signing_certificate, w, g.other_signing_certificates, trust,
                allow_untrusted_root or not enforce_root, at=at, allow_expired=allow_expired)
    check_chain(g.encryption_certificate, w, [g.signing_certificate, *g.other_signing_certificates], trust,
                allow_untrusted_root or not enforce_root, at=at, allow_expired=allow_expired)


# ------------------------------------------------------------------------------------------------
# Generation, saving, loading
# ------------------------------------------------------------------------------------------------


def _escape_rdn(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (i == 0 and ch in " #") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def validate_name(name: str) -> str:
    """Check a guardian name (1-64 printable characters)."""
    if not _NAME_RE.match(name or "") or name.strip() != name:
        raise UsageError(f"bad guardian name {name!r}", hint="use 1-64 printable characters, no leading/trailing spaces")
    return name


def generate_guardian(name: str, key: str = "rsa3072", days: int = 3650,
                      not_before: _dt.datetime | None = None) -> Guardian:
    """Generate a guardian with fresh self-signed signing and encryption certificates.

    ``key`` is ``rsa3072`` (default), ``rsa2048``, ``rsa4096``, ``ec-p256`` or ``ec-p384``; the two
    certificates get separate keys of that kind.
    """
    validate_name(name)
    if key not in GUARDIAN_KEY_KINDS:
        raise UsageError(f"unknown key kind {key!r}", hint=f"use one of {', '.join(GUARDIAN_KEY_KINDS)}")
    sk = _certs.new_key(key)
    ek = _certs.new_key(key)
    esc = _escape_rdn(name)
    sc = _certs.self_signed(f"CN=Shielded VM Signing Certificate ({esc})", sk, "signing", days, not_before)
    ec_ = _certs.self_signed(f"CN=Shielded VM Encryption Certificate ({esc})", ek, "encryption", days, not_before)
    from .sigalg import sign_bytes

    ecs = sign_bytes(sk, ec_.public_bytes(serialization.Encoding.DER))
    return Guardian(name, sc, ec_, sk, ek, source="generated", encryption_signature=ecs)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def save_guardian(g: Guardian, folder: str | os.PathLike[str], password: str | None,
                  overwrite: bool = False) -> Path:
    """Write a guardian folder; private keys go to PFX files (0600), encrypted when ``password``."""
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise UsageError("output exists and is not a folder", str(d))
    meta_path = d / "guardian.json"
    if meta_path.exists() and not overwrite:
        raise UsageError("a guardian already exists in this folder", str(d), "choose another folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"cannot create the folder: {e.strerror}", str(d)) from None
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": g.name,
        "source": g.source,
        "signing_certificate": "signing.pem",
        "encryption_certificate": "encryption.pem",
        "other_signing_certificates": "other-signing.pem" if g.other_signing_certificates else None,
        "signing_pfx": None,
        "encryption_pfx": None,
        "pfx_encrypted": None,
        "signing_thumbprint": g.thumbprint,
        "encryption_thumbprint": _certs.thumbprint(g.encryption_certificate, "sha1"),
        "encryption_certificate_signature": None if g.encryption_signature is None else {
            "algorithm": g.encryption_signature[0],
            "value": base64.b64encode(g.encryption_signature[1]).decode("ascii")},
    }
    write_bytes_atomic(d / "signing.pem", _pem(g.signing_certificate))
    write_bytes_atomic(d / "encryption.pem", _pem(g.encryption_certificate))
    if g.other_signing_certificates:
        write_bytes_atomic(d / "other-signing.pem", b"".join(_pem(c) for c in g.other_signing_certificates))
    if g.signing_key is not None and g.encryption_key is not None:
        pw = password.encode("utf-8") if password else None
        _certs.write_pfx(d / "signing.pfx", g.signing_key, g.signing_certificate, pw)
        _certs.write_pfx(d / "encryption.pfx", g.encryption_key, g.encryption_certificate, pw)
        meta.update(signing_pfx="signing.pfx", encryption_pfx="encryption.pfx", pfx_encrypted=bool(password))
    write_bytes_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    g.path = str(d)
    return d


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError("guardian.json not found", str(path), "give a folder made by 'guardian new' or 'guardian import'") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"unreadable guardian.json: {e}", str(path)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError("not a templatetool guardian description", str(path))
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"unsupported guardian format version {meta.get('version')!r}", str(path),
                          "upgrade templatetool")
    return meta


def _load_cert(path: Path) -> x509.Certificate:
    try:
        cert = _certs.load_certificates(path)[0]
    except (x509.InvalidVersion, UnsupportedAlgorithm) as e:
        raise FormatError(f"not a valid certificate: {_first_line(e)}", str(path)) from None
    check_certificate_parses(cert, "the certificate", str(path))
    return cert


def _norm_thumbprint(value: object, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"bad {key} in guardian.json", where)
    return value.strip().replace(":", "").upper()


def _verify_folder_certificates(g: Guardian, meta: dict[str, Any], where: str) -> None:
    """The certificate files must be the ones guardian.json recorded, and self-signatures must verify.

    signing.pem is checked against ``signing_thumbprint`` (and encryption.pem against
    ``encryption_thumbprint`` when recorded); a self-issued certificate's own signature and the
    signing key's signature over the encryption certificate must verify. IntegrityError otherwise.
    """
    hint = "the guardian folder was altered; restore it from a backup or re-import the guardian"
    for key, cert, label in (("signing_thumbprint", g.signing_certificate, "signing certificate"),
                             ("encryption_thumbprint", g.encryption_certificate, "encryption certificate")):
        if meta.get(key) is None:
            if key == "signing_thumbprint":
                raise FormatError("guardian.json lacks signing_thumbprint", where)
            continue
        if _norm_thumbprint(meta[key], key, where) != _certs.thumbprint(cert, "sha1"):
            raise IntegrityError(f"the {label} does not match the thumbprint recorded in guardian.json", where, hint)
    for cert, label in ((g.signing_certificate, "signing certificate"),
                        (g.encryption_certificate, "encryption certificate")):
        if _is_self_issued(cert, where):
            try:
                cert.verify_directly_issued_by(cert)
            except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as e:
                raise IntegrityError(f"the {label}'s self-signature does not verify ({type(e).__name__})",
                                     where, hint) from None
    if g.encryption_signature is not None:
        from .sigalg import verify_bytes

        alg, value = g.encryption_signature
        verify_bytes(g.signing_certificate.public_key(), alg, value,
                     g.encryption_certificate.public_bytes(serialization.Encoding.DER),
                     "the signing key's signature over the encryption certificate", where)


def load_guardian(path: str | os.PathLike[str], *, private: bool = False, password: Secret | None = None,
                  password_env: str | None = None,
                  allow_untrusted_root: bool = False, trust: list[x509.Certificate] = ()) -> Guardian:
    """Load a guardian from a folder (or its guardian.json), or from HGS metadata XML.

    With ``private=True`` the PFX files are opened; ``password`` (a value or a SecretSource,
    called only when the files are encrypted) opens encrypted ones. A guardian without private
    keys then raises CredentialError. ``password_env`` is the front ends' form (the hgs service,
    build recipes): the password from that variable or a terminal prompt. Metadata XML is
    verified on the way in (see :func:`templatetool.guardian.metadata.import_metadata`).
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".xml":
        from .metadata import import_metadata

        if private:
            raise CredentialError("guardian metadata holds no private keys", str(p),
                                  "give the guardian folder that has the keys")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ResourceError(f"cannot read: {e.strerror}", str(p)) from None
        g = import_metadata(data, name=p.stem, where=str(p), allow_untrusted_root=allow_untrusted_root, trust=trust)
        g.source = "metadata"
        return g
    if p.is_file() and p.name == "guardian.json":
        p = p.parent
    if not p.exists():
        raise NotFoundError("guardian not found", str(p), "give a guardian folder or metadata XML")
    meta = _read_json(p / "guardian.json")
    try:
        name = validate_name(str(meta["name"]))
        sc = _load_cert(p / meta["signing_certificate"])
        ecert = _load_cert(p / meta["encryption_certificate"])
        others = _certs.load_certificates(p / meta["other_signing_certificates"]) if meta.get("other_signing_certificates") else []
        source = str(meta.get("source", "imported"))
    except (KeyError, TypeError) as e:
        raise FormatError(f"incomplete guardian.json ({e})", str(p)) from None
    g = Guardian(name, sc, ecert, other_signing_certificates=others, source=source, path=str(p))
    ecs = meta.get("encryption_certificate_signature")
    if isinstance(ecs, dict):
        try:
            g.encryption_signature = (str(ecs["algorithm"]), base64.b64decode(ecs["value"], validate=True))
        except (KeyError, TypeError, ValueError):
            raise FormatError("bad encryption_certificate_signature in guardian.json", str(p)) from None
    for c in others:
        check_certificate_parses(c, "an other signing certificate", str(p))
    _verify_folder_certificates(g, meta, str(p))
    if private:
        if not meta.get("signing_pfx") or not meta.get("encryption_pfx"):
            raise CredentialError(f"guardian {name!r} has no private keys here", str(p),
                                  "use the folder where the guardian was generated")
        pw: bytes | None = None
        if meta.get("pfx_encrypted"):
            if password is None and password_env is None:
                raise CredentialError(f"guardian {name!r} has password-protected private keys and no password "
                                      "was given", str(p), "give the guardian's password", code="guardian.password-needed")
            pw = resolve_secret(password if password is not None else env_or_prompt(password_env,
                                                                                     f"password for guardian {name}: "))
        sk, scert, _ = _certs.load_pfx(p / meta["signing_pfx"], pw)
        ek, ecert2, _ = _certs.load_pfx(p / meta["encryption_pfx"], pw)
        der = serialization.Encoding.DER
        if scert.public_bytes(der) != sc.public_bytes(der) or ecert2.public_bytes(der) != ecert.public_bytes(der):
            raise IntegrityError("the PFX certificates differ from the guardian's certificates", str(p),
                                 "the guardian folder was altered")
        g.signing_key, g.encryption_key = sk, ek
    return g


def guardian_from_certificates(name: str, signing_cert: x509.Certificate, encryption_cert: x509.Certificate,
                               signing_key: _certs.PrivateKey | None = None,
                               encryption_key: _certs.PrivateKey | None = None) -> Guardian:
    """A guardian from certificates (and optionally keys) already in memory."""
    validate_name(name)
    return Guardian(name, signing_cert, encryption_cert, signing_key, encryption_key, source="certificates")
