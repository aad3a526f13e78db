"""The one Signer interface: a certificate (+ chain) and a `cryptography` private-key object.

Backends (PFX, PEM, PKCS#11) live beside this module; ``load_signer(spec)`` in
``templatetool.signers`` parses a CLI signer spec (``FILE.pfx | pem:KEY,CERT | pkcs11:URI``).
For PKCS#11 the private-key object signs inside the token (the key never leaves it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class Signer(ABC):
    """A signing identity."""

    #: The signing certificate.
    certificate: x509.Certificate
    #: Intermediate certificates to embed after the signing certificate (may be empty).
    chain: list[x509.Certificate]

    @abstractmethod
    def private_key(self) -> PrivateKeyTypes:
        """Return a `cryptography` private-key object (RSA or EC) able to ``sign``."""

    def describe(self) -> str:
        """A short human description (subject and backend), never containing secrets."""
        return f"{self.certificate.subject.rfc4514_string()}"
