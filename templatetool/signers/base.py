"""The one signing interface: a :class:`Signer` signs bytes and says its algorithm and certificates.

Modelled on pyHanko's signer: a signer only *signs bytes* (``sign_raw(data, digest)``, the signer
hashes); the formats that need a signature (CMS SignedData in ``templatetool.cms.signed``, the
XML-DSig of guardian metadata) build what is signed and call it. Implementations are siblings:

* :class:`KeySigner` — a ``cryptography`` private key held in memory (with its certificate);
  ``PfxSigner`` / ``PemSigner`` (``signers.files``) load one from a file;
* ``Pkcs11Signer`` (``signers.pkcs11_signer``) — the key stays in a PKCS#11 token.

No implementation subclasses ``cryptography``'s key classes or reads private attributes.

Secrets (PFX/key passwords, PINs) are passed as values: ``bytes``/``str``, or a
:data:`SecretSource` — a zero-argument callable returning the value, called only when the secret
is actually needed (an unencrypted PFX never asks). Reading environment variables and prompting
belongs to the caller (the CLI).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ..errors import FormatError, UnsupportedError
from ..secrets import Secret, SecretSource, resolve_secret


class KeyAlgorithm(IntEnum):
    """Signature algorithm families a :class:`Signer` can produce.

    ``RSA_PKCS1``: RSASSA-PKCS1-v1_5. ``RSA_PSS``: RSASSA-PSS with MGF1 over the same hash and a
    salt as long as the digest (the only PSS profile this project writes). ``ECDSA``: signature
    returned DER-encoded (X9.62 ``Ecdsa-Sig-Value``), as CMS carries it.
    """

    RSA_PKCS1 = 1
    RSA_PSS = 2
    ECDSA = 3

    @property
    def is_rsa(self) -> bool:
        """True for the RSA algorithms."""
        return self in (KeyAlgorithm.RSA_PKCS1, KeyAlgorithm.RSA_PSS)


@runtime_checkable
class Signer(Protocol):
    """A signing identity: signs bytes; knows its algorithm and certificate chain.

    ``key_algorithm`` is the signer's default algorithm: ``RSA_PKCS1`` for an RSA key (which also
    accepts ``algorithm=KeyAlgorithm.RSA_PSS``), ``ECDSA`` for an EC key.
    """

    @property
    def certificate(self) -> x509.Certificate:
        """The signing certificate."""
        ...

    @property
    def chain(self) -> Sequence[x509.Certificate]:
        """Intermediate certificates to embed after the signing certificate (may be empty)."""
        ...

    @property
    def key_algorithm(self) -> KeyAlgorithm:
        """The default signature algorithm of this signer's key."""
        ...

    def sign_raw(self, data: bytes, digest: hashes.HashAlgorithm, *, algorithm: KeyAlgorithm | None = None) -> bytes:
        """Sign ``data`` (the signer hashes it with ``digest``); ECDSA signatures are DER."""
        ...

    def describe(self) -> str:
        """A short human description (subject and backend), never containing secrets."""
        ...


def same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    """True when ``a`` and ``b`` are the same public key (compared as DER SubjectPublicKeyInfo,
    so keys of different types simply differ)."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def key_algorithm_of(public_key: object) -> KeyAlgorithm:
    """The default :class:`KeyAlgorithm` for an RSA or EC public/private key."""
    if isinstance(public_key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return KeyAlgorithm.RSA_PKCS1
    if isinstance(public_key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return KeyAlgorithm.ECDSA
    raise UnsupportedError(
        f"unsupported signing key type {type(public_key).__name__}", hint="use RSA or EC P-256/P-384"
    )


def check_algorithm(default: KeyAlgorithm, requested: KeyAlgorithm | None, where: str = "") -> KeyAlgorithm:
    """The algorithm to use: ``requested`` (if the key can do it) or the signer's ``default``."""
    if requested is None:
        return default
    if requested == default or (requested.is_rsa and default.is_rsa):
        return requested
    raise UnsupportedError(f"a {default.name} key cannot make a {requested.name} signature", where)


def pss_padding(digest: hashes.HashAlgorithm) -> padding.PSS:
    """The project's RSASSA-PSS profile: MGF1 with the same hash, salt length = digest length."""
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)


class KeySigner:
    """A :class:`Signer` over a ``cryptography`` RSA/EC private key held in memory.

    For keys the embedding program already holds (and the base of the file-backed signers).
    """

    def __init__(
        self,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        self._init_key(key, certificate, chain, "certificate")

    def _init_key(
        self, key: object, certificate: x509.Certificate, chain: Sequence[x509.Certificate], where: str
    ) -> None:
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise FormatError(f"unsupported key type {type(key).__name__}", where, "use RSA or EC P-256/P-384")
        if not same_public_key(key.public_key(), certificate.public_key()):  # e.g. an Ed25519 certificate
            raise FormatError(
                "the certificate does not match the private key", where, "give the certificate issued for this key"
            )
        self._key = key
        self.certificate = certificate
        self.chain: list[x509.Certificate] = list(chain)
        self.key_algorithm = key_algorithm_of(key)

    def sign_raw(self, data: bytes, digest: hashes.HashAlgorithm, *, algorithm: KeyAlgorithm | None = None) -> bytes:
        """Sign ``data`` hashed with ``digest`` (see :class:`KeyAlgorithm` for the encodings)."""
        return self._sign(bytes(data), digest, digest, algorithm)

    def sign_digest(
        self, digest_value: bytes, digest: hashes.HashAlgorithm, *, algorithm: KeyAlgorithm | None = None
    ) -> bytes:
        """Sign an already computed ``digest`` value (``len == digest.digest_size``)."""
        if len(digest_value) != digest.digest_size:
            raise UnsupportedError(f"a {digest.name} digest is {digest.digest_size} bytes, got {len(digest_value)}")
        return self._sign(bytes(digest_value), utils.Prehashed(digest), digest, algorithm)

    def _sign(
        self,
        data: bytes,
        alg: hashes.HashAlgorithm | utils.Prehashed,
        digest: hashes.HashAlgorithm,
        algorithm: KeyAlgorithm | None,
    ) -> bytes:
        use = check_algorithm(self.key_algorithm, algorithm, self.describe())
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            pad: padding.AsymmetricPadding = pss_padding(digest) if use == KeyAlgorithm.RSA_PSS else padding.PKCS1v15()
            return key.sign(data, pad, alg)
        return key.sign(data, ec.ECDSA(alg))

    def private_key(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        """The in-memory private key (file-backed signers only; not part of :class:`Signer`)."""
        return self._key

    def describe(self) -> str:
        """The certificate subject."""
        return self.certificate.subject.rfc4514_string()


__all__ = [
    "KeyAlgorithm",
    "KeySigner",
    "Secret",
    "SecretSource",
    "Signer",
    "check_algorithm",
    "key_algorithm_of",
    "pss_padding",
    "resolve_secret",
]
