"""File-backed signers: PFX/PKCS#12 and PEM key + certificate (+ chain).

Passwords are values (``bytes``/``str``) or a :data:`~templatetool.signers.base.SecretSource`
called only when the file turns out to be encrypted; these classes never read environment
variables or prompt.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ..errors import CredentialError, FormatError, NotFoundError, ResourceError
from .base import KeySigner, Secret, resolve_secret
from .certs import load_certificates, load_pfx_bytes


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found", path) from None
    except OSError as e:
        raise ResourceError(f"cannot read the {what}: {e.strerror}", path) from None


class PfxSigner(KeySigner):
    """A signer from a PFX/PKCS#12 file (AES/PBES2 or legacy 3DES/RC2).

    ``password`` (a value or a :data:`SecretSource`): when None, only an unencrypted or
    empty-password file opens (else CredentialError); a SecretSource is called only when the
    file does not open without a password.
    """

    def __init__(self, path: str | os.PathLike[str], password: Secret | None = None) -> None:
        self.path = os.fspath(path)
        data = _read(self.path, "PFX file")
        if password is not None and not callable(password):
            key, cert, chain = load_pfx_bytes(data, resolve_secret(password), self.path)
        else:
            try:
                key, cert, chain = load_pfx_bytes(data, None, self.path)
            except CredentialError:
                try:
                    key, cert, chain = load_pfx_bytes(data, b"", self.path)
                except CredentialError:
                    if password is None:
                        raise CredentialError("the PFX file needs a password", self.path) from None
                    key, cert, chain = load_pfx_bytes(data, resolve_secret(password), self.path)
        self._init_key(key, cert, chain, self.path)

    def describe(self) -> str:
        """Subject and backend."""
        return f"{self.certificate.subject.rfc4514_string()} (PFX {os.path.basename(self.path)})"


class PemSigner(KeySigner):
    """A signer from a PEM (or DER) private key, a certificate and optional chain bundle.

    ``password`` is needed only for an encrypted key (a SecretSource is called only then).
    """

    def __init__(
        self,
        key_path: str | os.PathLike[str],
        cert_path: str | os.PathLike[str],
        chain_path: str | os.PathLike[str] | None = None,
        password: Secret | None = None,
    ) -> None:
        self.key_path = os.fspath(key_path)
        data = _read(self.key_path, "private key file")
        pw = None if password is None or callable(password) else resolve_secret(password)
        key = self._load_key(data, pw)
        if key is None:  # encrypted and no password yet
            if password is None:
                raise CredentialError("the private key needs a password", self.key_path)
            key = self._load_key(data, resolve_secret(password))
            if key is None:
                raise CredentialError("the private key needs a password", self.key_path)
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise FormatError(f"unsupported key type {type(key).__name__}", self.key_path, "use RSA or EC P-256/P-384")
        certs = load_certificates(os.fspath(cert_path))
        chain = list(certs[1:]) + (load_certificates(os.fspath(chain_path)) if chain_path else [])
        self._init_key(key, certs[0], chain, os.fspath(cert_path))

    def _load_key(self, data: bytes, pw: bytes | None) -> PrivateKeyTypes | None:
        loader = serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
        try:
            return loader(data, pw)
        except TypeError:
            if pw is None:
                return None  # encrypted: needs a password
            raise CredentialError(
                "the private key is not encrypted but a password was given",
                self.key_path,
                "give no password for this key",
            ) from None
        except ValueError as e:
            if pw is not None and (
                "decrypt" in str(e).lower() or "password" in str(e).lower() or "bad" in str(e).lower()
            ):
                raise CredentialError("cannot decrypt the private key: wrong password", self.key_path) from None
            raise FormatError(f"not a readable private key: {e}", self.key_path) from None

    def describe(self) -> str:
        """Subject and backend."""
        return f"{self.certificate.subject.rfc4514_string()} (PEM {os.path.basename(self.key_path)})"
