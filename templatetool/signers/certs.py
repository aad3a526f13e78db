"""Keys, self-signed certificates and PFX (PKCS#12) files for signing and encryption identities.

``new_key`` / ``self_signed`` make lab/test identities (``templatetool cert new``);
``write_pfx`` writes a modern PFX (PBES2, AES-256-CBC, HMAC-SHA256 MAC) atomically with mode
0600; ``load_pfx`` reads modern and legacy (3DES/RC2) files. Everything uses ``cryptography``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..atomic import write_bytes_atomic
from ..errors import CredentialError, FormatError, NotFoundError, ResourceError, UsageError
from .base import same_public_key

#: Key kinds accepted by :func:`new_key` (and ``cert new --key``).
KEY_KINDS = ("rsa3072", "rsa2048", "rsa4096", "ec-p256", "ec-p384")

#: Microsoft "Document Encryption" EKU (what New-SelfSignedCertificate -Type DocumentEncryptionCert sets).
DOCUMENT_ENCRYPTION_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.311.80.1")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str = "rsa3072") -> PrivateKey:
    """Generate a private key: ``rsa2048|rsa3072|rsa4096|ec-p256|ec-p384``."""
    if kind in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise UsageError(f"unknown key kind {kind!r}", hint=f"use one of {', '.join(KEY_KINDS)}")


def parse_subject(subject: str) -> x509.Name:
    """Parse ``CN=...[,O=...]`` (RFC 4514 string) into an x509 Name."""
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except (ValueError, TypeError) as e:
        raise UsageError(f"bad subject {subject!r}: {e}", hint='use e.g. "CN=Template Signer"') from None
    if not list(name):
        raise UsageError("empty subject", hint='use e.g. "CN=Template Signer"')
    return name


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def self_signed(
    subject: str, key: PrivateKey, usage: str = "signing", days: int = 3650, not_before: _dt.datetime | None = None
) -> x509.Certificate:
    """A self-signed end-entity certificate for ``key``.

    ``usage='signing'`` sets KeyUsage digitalSignature (+ codeSigning EKU); ``'encryption'`` sets
    keyEncipherment for RSA keys and keyAgreement for EC keys. Serial is random, validity starts
    one hour in the past (clock skew) unless ``not_before`` is given.
    """
    if usage not in ("signing", "encryption"):
        raise UsageError(f"unknown certificate usage {usage!r}", hint="use 'signing' or 'encryption'")
    name = parse_subject(subject)
    start = not_before or (_dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1))
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    sign = usage == "signing"
    ku = x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=(not sign) and is_rsa,
        data_encipherment=(not sign) and is_rsa,
        key_agreement=(not sign) and not is_rsa,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if sign:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([DOCUMENT_ENCRYPTION_EKU]), critical=False)
    return builder.sign(key, _hash_for(key))


def ca_certificate(subject: str, key: PrivateKey, days: int = 3650) -> x509.Certificate:
    """A self-signed CA certificate (keyCertSign, cRLSign) — for tests and labs."""
    name = parse_subject(subject)
    start = _dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _hash_for(key))
    )


def issue_certificate(
    subject: str,
    key_public: CertificatePublicKeyTypes,
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    usage: str = "signing",
    days: int = 365,
    not_before: _dt.datetime | None = None,
) -> x509.Certificate:
    """An end-entity certificate for ``key_public`` issued by ``ca_cert`` — for tests and labs."""
    name = parse_subject(subject)
    start = not_before or (_dt.datetime.now(_dt.UTC) - _dt.timedelta(hours=1))
    sign = usage == "signing"
    is_rsa = isinstance(key_public, rsa.RSAPublicKey)
    ku = x509.KeyUsage(sign, False, (not sign) and is_rsa, False, (not sign) and not is_rsa, False, False, False, False)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(key_public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key_public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )


def pfx_bytes(
    key: PrivateKey,
    cert: x509.Certificate,
    password: bytes | None,
    chain: Iterable[x509.Certificate] = (),
    friendly_name: bytes | None = None,
) -> bytes:
    """Serialise a PFX: PBES2/PBKDF2-SHA256/AES-256-CBC for key and certs, HMAC-SHA256 MAC."""
    if password:
        enc = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(100_000)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password)
        )
    else:
        enc = serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(friendly_name, key, cert, list(chain) or None, enc)


def write_pfx(
    path: str | os.PathLike[str],
    key: PrivateKey,
    cert: x509.Certificate,
    password: bytes | None,
    chain: Sequence[x509.Certificate] = (),
) -> None:
    """Write a PFX atomically with mode 0600 (AES-256 PBES2; unencrypted when password is None)."""
    write_bytes_atomic(path, pfx_bytes(key, cert, password, chain), mode=0o600)


def load_pfx_bytes(
    data: bytes, password: bytes | None, where: str = "<pfx>"
) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    """Parse PFX bytes (AES/PBES2 or legacy 3DES/RC2). Wrong password → CredentialError."""
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError as e:
        msg = str(e).lower()
        if "password" in msg or "mac" in msg or "decrypt" in msg:
            raise CredentialError("cannot open the PFX: wrong password", where, "check the password variable") from None
        raise FormatError(f"not a readable PFX/PKCS#12 file: {e}", where) from None
    except TypeError as e:  # password given for an unencrypted file or vice versa
        raise CredentialError(f"cannot open the PFX: {e}", where, "check the password variable") from None
    if key is None or cert is None:
        raise FormatError(
            "the PFX does not hold a private key and its certificate", where, "export it with its private key"
        )
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise FormatError(f"unsupported key type {type(key).__name__}", where, "use RSA or EC P-256/P-384")
    if not same_public_key(key.public_key(), cert.public_key()):
        # Some PFX files list several certs; pick the one matching the key.
        for c in extra:
            if same_public_key(c.public_key(), key.public_key()):
                extra = [x for x in extra if x is not c] + [cert]
                cert = c
                break
        else:
            raise FormatError("the PFX certificate does not match its private key", where)
    return key, cert, list(extra)


def load_pfx(
    path: str | os.PathLike[str], password: bytes | str | None
) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    """Load (key, cert, chain) from a PFX file. Wrong password → CredentialError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFoundError("PFX file not found", str(path)) from None
    except OSError as e:
        raise ResourceError(f"cannot read the PFX: {e.strerror}", str(path)) from None
    if isinstance(password, str):
        password = password.encode("utf-8")
    return load_pfx_bytes(data, password, str(path))


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Load one or more certificates from a PEM (bundle) or DER file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NotFoundError("certificate file not found", str(path)) from None
    except OSError as e:
        raise ResourceError(f"cannot read the certificate: {e.strerror}", str(path)) from None
    if _is_pkcs12(data):
        raise FormatError(
            "not a PEM/DER certificate but a PKCS#12 (.pfx) file",
            str(path),
            "pass the signer's .crt/.pem certificate (a .pfx holds a private key)",
        )
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        # the parser's own message (a Rust ParseError dump) means nothing to a user
        raise FormatError(
            "not a PEM/DER X.509 certificate", str(path), "pass the signer's .crt/.pem certificate"
        ) from None


def _is_pkcs12(data: bytes) -> bool:
    """DER PFX: SEQUENCE { INTEGER 3 (version), ... } (RFC 7292 section 4); a certificate's first
    element is a SEQUENCE (tbsCertificate) instead."""
    if len(data) < 8 or data[0] != 0x30:
        return False
    n = data[1]
    pos = 2 if n < 0x80 else 2 + (n & 0x7F)
    return data[pos : pos + 3] == b"\x02\x01\x03"


def thumbprint(cert: x509.Certificate, algorithm: str = "sha1") -> str:
    """Certificate thumbprint as upper-case hex (Windows convention: SHA-1 of the DER)."""
    h = hashes.SHA1() if algorithm == "sha1" else hashes.SHA256()
    return cert.fingerprint(h).hex().upper()


def cert_file_name(cert: x509.Certificate) -> str:
    """The certificate's CN, or its RFC 4514 subject."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()
