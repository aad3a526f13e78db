"""Key release: KP + health certificate → the KP's secret, re-wrapped to the attested host."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from typing import Any

from cryptography import x509

from ..cms.enveloped import envelope, open_envelope
from .attest import verify_health_certificate


def release_key(
    kp_xml: bytes,
    health_cert: x509.Certificate,
    guardian: Any,
    attestation_cert: x509.Certificate,
    *,
    at: _dt.datetime | None = None,
    where: str = "key protector",
    check: Callable[[bytes], None] | None = None,
) -> bytes:
    """Guardian side: check the health certificate (issuer, EKU, freshness), unwrap the KP with the
    guardian's private keys (which verifies the KP's signatures and MAC) and return the secret
    enveloped (CMS AuthEnvelopedData, AES-256-GCM) to the health certificate's key only.
    ``check`` sees the secret before it is enveloped and may refuse it by raising (the vTPM state
    ledger does).
    """
    from ..kp import unwrap

    verify_health_certificate(health_cert, attestation_cert, at=at)
    secret = unwrap(kp_xml, guardian)
    if check is not None:
        check(secret)
    return envelope(secret, [health_cert])


def open_release(released: bytes, host_encryption_key: Any, health_cert: x509.Certificate) -> bytes:
    """Host side: open a key release with the host's encryption key."""
    return open_envelope(released, host_encryption_key, health_cert, where="key release")
