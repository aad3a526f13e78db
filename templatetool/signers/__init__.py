"""Signers: PFX/PKCS#12, PEM key + certificate, PKCS#11 URI (RFC 7512).

``load_signer(spec)`` parses a CLI signer spec:

* ``FILE.pfx`` / ``FILE.p12`` — password from ``$password_env`` (or a prompt);
* ``pem:KEY,CERT[,CHAIN]`` — PEM/DER key (encrypted: password from ``$password_env``/prompt);
* ``pkcs11:URI`` — RFC 7512 URI, PIN from ``$pin_env`` (default ``TEMPLATETOOL_PKCS11_PIN``).
"""

from __future__ import annotations

from ..errors import UsageError
from .base import Signer
from .files import PemSigner, PfxSigner
from .pkcs11_signer import Pkcs11Signer


def load_signer(spec: str, password_env: str | None = None, pin_env: str | None = None) -> Signer:
    """Open the signer described by ``spec`` (see the module docstring)."""
    if not spec:
        raise UsageError("empty signer spec", hint="use FILE.pfx, pem:KEY,CERT[,CHAIN] or pkcs11:URI")
    if spec.startswith("pkcs11:"):
        return Pkcs11Signer(spec, pin_env=pin_env)
    if spec.startswith("pem:"):
        parts = spec[4:].split(",")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError("bad PEM signer spec", spec, "use pem:KEY,CERT[,CHAIN]")
        return PemSigner(parts[0], parts[1], parts[2] if len(parts) == 3 else None, password_env=password_env)
    return PfxSigner(spec, password_env=password_env)


__all__ = ["Signer", "load_signer", "PfxSigner", "PemSigner", "Pkcs11Signer"]
