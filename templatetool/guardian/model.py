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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..atomic import write_bytes_atomic
from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    NotFoundError,
    ResourceError,
    UsageError,
)
from ..secrets import env_or_prompt
from ..signers import certs as _certs
from ..signers.base import Secret, resolve_secret
from .core import (
    Guardian,
    _first_line,
    _is_self_issued,
    check_certificate_parses,
    check_chain,
    check_guardian,
    check_usage,
    check_validity,
    describe_certificate,
    validate_name,
)
from .metadata import import_metadata

FORMAT = "templatetool-guardian"
FORMAT_VERSION = 1
GUARDIAN_KEY_KINDS = ("rsa3072", "rsa2048", "rsa4096", "ec-p256", "ec-p384")


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


def generate_guardian(
    name: str, key: str = "rsa3072", days: int = 3650, not_before: _dt.datetime | None = None
) -> Guardian:
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


def save_guardian(g: Guardian, folder: str | os.PathLike[str], password: str | None, overwrite: bool = False) -> Path:
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
        "encryption_certificate_signature": None
        if g.encryption_signature is None
        else {
            "algorithm": g.encryption_signature[0],
            "value": base64.b64encode(g.encryption_signature[1]).decode("ascii"),
        },
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
        raise NotFoundError(
            "guardian.json not found", str(path), "give a folder made by 'guardian new' or 'guardian import'"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"unreadable guardian.json: {e}", str(path)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError("not a templatetool guardian description", str(path))
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(
            f"unsupported guardian format version {meta.get('version')!r}", str(path), "upgrade templatetool"
        )
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
    for key, cert, label in (
        ("signing_thumbprint", g.signing_certificate, "signing certificate"),
        ("encryption_thumbprint", g.encryption_certificate, "encryption certificate"),
    ):
        if meta.get(key) is None:
            if key == "signing_thumbprint":
                raise FormatError("guardian.json lacks signing_thumbprint", where)
            continue
        if _norm_thumbprint(meta[key], key, where) != _certs.thumbprint(cert, "sha1"):
            raise IntegrityError(f"the {label} does not match the thumbprint recorded in guardian.json", where, hint)
    for cert, label in (
        (g.signing_certificate, "signing certificate"),
        (g.encryption_certificate, "encryption certificate"),
    ):
        if _is_self_issued(cert, where):
            try:
                cert.verify_directly_issued_by(cert)
            except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError) as e:
                raise IntegrityError(
                    f"the {label}'s self-signature does not verify ({type(e).__name__})", where, hint
                ) from None
    if g.encryption_signature is not None:
        from .sigalg import verify_bytes

        alg, value = g.encryption_signature
        verify_bytes(
            g.signing_certificate.public_key(),
            alg,
            value,
            g.encryption_certificate.public_bytes(serialization.Encoding.DER),
            "the signing key's signature over the encryption certificate",
            where,
        )


def load_guardian(
    path: str | os.PathLike[str],
    *,
    private: bool = False,
    password: Secret | None = None,
    password_env: str | None = None,
    allow_untrusted_root: bool = False,
    trust: Sequence[x509.Certificate] = (),
) -> Guardian:
    """Load a guardian from a folder (or its guardian.json), or from HGS metadata XML.

    With ``private=True`` the PFX files are opened; ``password`` (a value or a SecretSource,
    called only when the files are encrypted) opens encrypted ones. A guardian without private
    keys then raises CredentialError. ``password_env`` is the front ends' form (the hgs service,
    build recipes): the password from that variable or a terminal prompt. Metadata XML is
    verified on the way in (see :func:`templatetool.guardian.metadata.import_metadata`).
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".xml":
        if private:
            raise CredentialError(
                "guardian metadata holds no private keys", str(p), "give the guardian folder that has the keys"
            )
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
        others = (
            _certs.load_certificates(p / meta["other_signing_certificates"])
            if meta.get("other_signing_certificates")
            else []
        )
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
            raise CredentialError(
                f"guardian {name!r} has no private keys here", str(p), "use the folder where the guardian was generated"
            )
        pw: bytes | None = None
        if meta.get("pfx_encrypted"):
            if password is None and password_env is None:
                raise CredentialError(
                    f"guardian {name!r} has password-protected private keys and no password was given",
                    str(p),
                    "give the guardian's password",
                    code="guardian.password-needed",
                )
            pw = resolve_secret(
                password if password is not None else env_or_prompt(password_env, f"password for guardian {name}: ")
            )
        sk, scert, _ = _certs.load_pfx(p / meta["signing_pfx"], pw)
        ek, ecert2, _ = _certs.load_pfx(p / meta["encryption_pfx"], pw)
        der = serialization.Encoding.DER
        if scert.public_bytes(der) != sc.public_bytes(der) or ecert2.public_bytes(der) != ecert.public_bytes(der):
            raise IntegrityError(
                "the PFX certificates differ from the guardian's certificates",
                str(p),
                "the guardian folder was altered",
            )
        g.signing_key, g.encryption_key = sk, ek
    return g


def guardian_from_certificates(
    name: str,
    signing_cert: x509.Certificate,
    encryption_cert: x509.Certificate,
    signing_key: _certs.PrivateKey | None = None,
    encryption_key: _certs.PrivateKey | None = None,
) -> Guardian:
    """A guardian from certificates (and optionally keys) already in memory."""
    validate_name(name)
    return Guardian(name, signing_cert, encryption_cert, signing_key, encryption_key, source="certificates")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GUARDIAN_KEY_KINDS",
    # the value type and its checks live in .core; re-exported here for existing importers
    "Guardian",
    "check_certificate_parses",
    "check_chain",
    "check_guardian",
    "check_usage",
    "check_validity",
    "describe_certificate",
    "generate_guardian",
    "guardian_from_certificates",
    "load_guardian",
    "save_guardian",
    "validate_name",
]
