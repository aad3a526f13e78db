"""Signers: PFX/PKCS#12, PEM key + certificate, PKCS#11 URI (RFC 7512)."""

from .base import Signer

__all__ = ["Signer"]
