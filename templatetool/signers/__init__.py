"""Signers: the :class:`Signer` protocol and its implementations (PFX, PEM, in-memory key, PKCS#11).

``load_signer(spec, password=..., pin=...)`` opens a signer spec:

* ``FILE.pfx`` / ``FILE.p12`` — ``password`` for an encrypted file;
* ``pem:KEY,CERT[,CHAIN]`` — PEM/DER key (``password`` for an encrypted key);
* ``pkcs11:URI`` — RFC 7512 URI, ``pin`` is the token's user PIN.

Secrets are values (``bytes``/``str``) or a SecretSource (a callable, called only when needed).
"""

from __future__ import annotations

from ..errors import UsageError
from .base import KeyAlgorithm, KeySigner, Secret, SecretSource, Signer, resolve_secret
from .certs import load_certificates, new_key, self_signed, thumbprint, write_pfx
from .files import PemSigner, PfxSigner
from .pkcs11_signer import Pkcs11Signer


def load_signer(
    spec: str, *, password: Secret | None = None, pin: Secret | None = None, pkcs11_module: str | None = None
) -> Signer:
    """Open the signer described by ``spec`` (see the module docstring); ``pkcs11_module`` is the
    PKCS#11 library used when a ``pkcs11:`` URI names no ``module-path``."""
    if not spec:
        raise UsageError("empty signer spec", hint="use FILE.pfx, pem:KEY,CERT[,CHAIN] or pkcs11:URI")
    if spec.startswith("pkcs11:"):
        return Pkcs11Signer(spec, pin=pin, default_module=pkcs11_module)
    if spec.startswith("pem:"):
        parts = spec[4:].split(",")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError("bad PEM signer spec", spec, "use pem:KEY,CERT[,CHAIN]")
        return PemSigner(parts[0], parts[1], parts[2] if len(parts) == 3 else None, password=password)
    return PfxSigner(spec, password=password)


__all__ = [
    "KeyAlgorithm",
    "KeySigner",
    "PemSigner",
    "PfxSigner",
    "Pkcs11Signer",
    "Secret",
    "SecretSource",
    "Signer",
    "load_certificates",
    "load_signer",
    "new_key",
    "resolve_secret",
    "self_signed",
    "thumbprint",
    "write_pfx",
]
