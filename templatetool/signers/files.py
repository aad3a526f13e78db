"""File-backed signers: PFX/PKCS#12 and PEM key + certificate (+ chain)."""

from __future__ import annotations

import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ..errors import CredentialError, FormatError, NotFoundError, ResourceError
from ..secrets import read_secret
from .base import Signer
from .certs import load_certificates, load_pfx_bytes


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found", path) from None
    except OSError as e:
        raise ResourceError(f"cannot read the {what}: {e.strerror}", path) from None


def _check_match(key: PrivateKeyTypes, cert: x509.Certificate, where: str) -> None:
    try:
        same = key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    except AttributeError:
        same = False
    if not same:
        raise FormatError("the certificate does not match the private key", where,
                          "give the certificate issued for this key")


class PfxSigner(Signer):
    """A signer from a PFX/PKCS#12 file (AES/PBES2 or legacy 3DES/RC2).

    The password comes from ``$password_env`` when given; otherwise an unencrypted or
    empty-password file opens directly and anything else prompts on the terminal.
    """

    def __init__(self, path: str, password_env: str | None = None) -> None:
        self.path = str(path)
        data = _read(self.path, "PFX file")
        if password_env:
            pw: bytes | None = read_secret(password_env, "PFX password: ").encode("utf-8")
            key, cert, chain = load_pfx_bytes(data, pw, self.path)
        else:
            try:
                key, cert, chain = load_pfx_bytes(data, None, self.path)
            except CredentialError:
                try:
                    key, cert, chain = load_pfx_bytes(data, b"", self.path)
                except CredentialError:
                    pw = read_secret(None, f"password for {os.path.basename(self.path)}: ").encode("utf-8")
                    key, cert, chain = load_pfx_bytes(data, pw, self.path)
        self._key = key
        self.certificate = cert
        self.chain = list(chain)

    def private_key(self) -> PrivateKeyTypes:
        return self._key

    def describe(self) -> str:
        return f"{self.certificate.subject.rfc4514_string()} (PFX {os.path.basename(self.path)})"


class PemSigner(Signer):
    """A signer from a PEM (or DER) private key, a certificate and optional chain bundle.

    An encrypted key's password comes from ``$password_env`` or a prompt.
    """

    def __init__(self, key_path: str, cert_path: str, chain_path: str | None = None,
                 password_env: str | None = None) -> None:
        self.key_path = str(key_path)
        data = _read(self.key_path, "private key file")
        pw: bytes | None = None
        if password_env:
            pw = read_secret(password_env, "key password: ").encode("utf-8")
        key = self._load_key(data, pw)
        if key is None:  # encrypted and no password yet
            pw = read_secret(None, f"password for {os.path.basename(self.key_path)}: ").encode("utf-8")
            key = self._load_key(data, pw)
            if key is None:
                raise CredentialError("the private key needs a password", self.key_path)
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise FormatError(f"unsupported key type {type(key).__name__}", self.key_path,
                              "use RSA or EC P-256/P-384")
        certs = load_certificates(cert_path)
        self.certificate = certs[0]
        _check_match(key, self.certificate, str(cert_path))
        self.chain = list(certs[1:]) + (load_certificates(chain_path) if chain_path else [])
        self._key = key

    def _load_key(self, data: bytes, pw: bytes | None) -> PrivateKeyTypes | None:
        loader = serialization.load_pem_private_key if b"-----BEGIN" in data else serialization.load_der_private_key
        try:
            return loader(data, pw)
        except TypeError:
            if pw is None:
                return None  # encrypted: needs a password
            raise CredentialError("the private key is not encrypted but a password was given",
                                  self.key_path, "drop the password option") from None
        except ValueError as e:
            if pw is not None and ("decrypt" in str(e).lower() or "password" in str(e).lower()
                                   or "bad" in str(e).lower()):
                raise CredentialError("cannot decrypt the private key: wrong password", self.key_path) from None
            raise FormatError(f"not a readable private key: {e}", self.key_path) from None

    def private_key(self) -> PrivateKeyTypes:
        return self._key

    def describe(self) -> str:
        return f"{self.certificate.subject.rfc4514_string()} (PEM {os.path.basename(self.key_path)})"
