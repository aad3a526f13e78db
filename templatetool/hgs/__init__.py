"""Guardian side, offline: host attestation, health certificates and key release.

Modelled on Microsoft's Host Guardian Service ([MS-HGSA]/[MS-KPS]): a guardian trusts hosts by
**host key** (registered public keys) or by **TPM** (registered EK public key, a PCR baseline
replayed from a reference TCG log, allowed code-integrity policy hashes). A host presents an
evidence file; a passing host receives a **health certificate** (X.509, issued by the guardian's
signing key, certifying the host's encryption key, 8 hours by default); key release checks the
key protector, the health certificate and its freshness, and re-wraps the released secret to the
host's key (CMS AuthEnvelopedData to the health certificate). See docs/formats/attestation.md.
"""

from .attest import (
    AttestationPolicy,
    HealthCheck,
    attest,
    init_attestation,
    load_attestation,
    load_health_certificate,
    verify_health_certificate,
)
from .host import Host, create_evidence, load_host, new_host
from .release import open_release, release_key

__all__ = [
    "AttestationPolicy",
    "HealthCheck",
    "Host",
    "attest",
    "create_evidence",
    "init_attestation",
    "load_attestation",
    "load_health_certificate",
    "load_host",
    "new_host",
    "open_release",
    "release_key",
    "verify_health_certificate",
]
