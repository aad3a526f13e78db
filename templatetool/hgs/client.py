"""Client of the HGS network service (httpx): attest a host, release a VM's key over HTTP.

Each ErrorReply / KPS fault comes back as the typed error it stands for (PolicyError for a refused
attestation or health certificate, IntegrityError for a tampered KP, FormatError for a request
the service found malformed); an unreachable service is a ResourceError.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import FormatError, ResourceError
from . import wire
from .host import Host, create_evidence
from .release import open_release

ATTESTATION_TYPES = ("HealthCertificateReply", *wire.ERROR_STATUS)


class HgsClient:
    """Talks to one ``hgs serve`` URL, e.g. ``http://127.0.0.1:8080``."""

    def __init__(self, base_url: str, *, timeout: float = 30.0, verify: Any = True) -> None:
        try:
            import httpx
        except ImportError:
            raise ResourceError("the HGS client needs httpx", hint="pip install 'templatetool[hgs]'") from None
        self._httpx = httpx
        self.base_url = base_url.rstrip("/")
        self._c = httpx.Client(base_url=self.base_url, timeout=timeout, verify=verify)

    def close(self) -> None:
        """Close the connection pool."""
        self._c.close()

    def __enter__(self) -> HgsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            return self._c.request(method, path, **kw)
        except self._httpx.HTTPError as e:
            raise ResourceError(
                f"HGS unreachable: {type(e).__name__}", f"{self.base_url}{path}", "is `hgs serve` running at this URL?"
            ) from None

    def _wcf(self, method: str, path: str, expected: str, **kw: Any) -> dict[str, Any]:
        r = self._request(method, path, **kw)
        where = f"{self.base_url}{path}"
        name, m = wire.parse_wcf(r.content, (expected, *wire.ERROR_STATUS), where)
        if name != expected:
            wire.raise_error_reply(name, m, where)
        return m

    # -- attestation ---------------------------------------------------------------------------
    def get_info(self) -> dict[str, Any]:
        """GET /Attestation/Getinfo (protocol versions, modes and a fresh server nonce)."""
        return self._wcf("GET", "/Attestation/Getinfo", "GetInfoReply")

    def signing_certificates(self) -> list[x509.Certificate]:
        """The attestation signer certificate(s) health certificates chain to."""
        m = self._wcf("GET", "/Attestation/v2.0/signingCertificates", "SigningCertificatesReply")
        try:
            return [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in m["Certificates"]]
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError("malformed SigningCertificatesReply", self.base_url) from None

    def attest_evidence(self, evidence: bytes) -> x509.Certificate:
        """POST evidence (already bound to a server nonce); returns the health certificate."""
        body = wire.dump_wcf("AttestationRequest", {"Evidence": wire.b64(evidence)})
        m = self._wcf(
            "POST",
            "/Attestation/v2.0/hostkeyattest",
            "HealthCertificateReply",
            content=body,
            headers={"content-type": "application/json"},
        )
        try:
            return x509.load_der_x509_certificate(base64.b64decode(m["HealthCertificate"], validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError("malformed HealthCertificateReply", self.base_url) from None

    def attest(self, host: Host, **evidence_kw: Any) -> x509.Certificate:
        """Get a server nonce, sign evidence with it (host-key mode, or TPM mode via ``tcg_log=`` ...), attest."""
        nonce = self.get_info().get("Nonce")
        if not isinstance(nonce, str):
            raise FormatError("GetInfoReply carries no Nonce", self.base_url)
        return self.attest_evidence(create_evidence(host, nonce=nonce, **evidence_kw))

    def attest_tpm(
        self, host: Host, tpm: Any, tcg_log: bytes, *, ci_policy_hash: str | None = None, pcrs: list[int] | None = None
    ) -> x509.Certificate:
        """TPM mode: evidence with the TCG log, the credential challenge answered by ``tpm``
        (:class:`~templatetool.hgs.tpmhost.TpmHost`: ActivateCredential), then a TPM quote over the
        service's baseline PCRs (or ``pcrs``) with this round's qualifying data."""
        from ..tpm.algs import bank_id
        from .service import quote_qualifying

        nonce = self.get_info().get("Nonce")
        if not isinstance(nonce, str):
            raise FormatError("GetInfoReply carries no Nonce", self.base_url)
        ev = create_evidence(
            host, tcg_log=tcg_log, ek_public_pem=tpm.ek_pem(), ci_policy_hash=ci_policy_hash, nonce=nonce
        )
        base = {"Evidence": wire.b64(ev), "EkPublic": wire.b64(tpm.ek_public), "AkPublic": wire.b64(tpm.ak_public)}
        path, hdr = "/Attestation/v2.0/hostkeyattest", {"content-type": "application/json"}
        ch = self._wcf(
            "POST", path, "TpmChallengeReply", content=wire.dump_wcf("AttestationRequest", base), headers=hdr
        )
        try:
            blob = base64.b64decode(ch["CredentialBlob"], validate=True)
            secret = base64.b64decode(ch["EncryptedSecret"], validate=True)
            bank = bank_id(str(ch.get("PcrBank", "sha256")))
            sel = [int(i) for i in (pcrs if pcrs is not None else ch["Pcrs"])]
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError("malformed TpmChallengeReply", self.base_url) from None
        credential = tpm.activate(blob, secret)
        quote, sig = tpm.quote(quote_qualifying(nonce, credential), sel, bank)
        body = wire.dump_wcf(
            "AttestationRequest",
            {**base, "Credential": wire.b64(credential), "Quote": wire.b64(quote), "QuoteSignature": wire.b64(sig)},
        )
        m = self._wcf("POST", path, "HealthCertificateReply", content=body, headers=hdr)
        try:
            return x509.load_der_x509_certificate(base64.b64decode(m["HealthCertificate"], validate=True))
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError("malformed HealthCertificateReply", self.base_url) from None

    # -- key protection -----------------------------------------------------------------------
    def metadata(self) -> bytes:
        """The guardian metadata XML (import it with ``guardian import``)."""
        r = self._request("GET", "/KeyProtection/service/metadata/2014-07/metadata.xml")
        if r.status_code != 200:
            raise ResourceError(f"metadata request failed: HTTP {r.status_code}", self.base_url)
        return bytes(r.content)

    def roll_transport_key(
        self,
        kp: bytes,
        health_cert: x509.Certificate,
        version: str = "v1",
        vtpm_state_sha256: str | None = None,
    ) -> tuple[bytes, bytes]:
        """POST RollTransportKey; returns (egress protector, keys enveloped to the health certificate).
        ``vtpm_state_sha256`` names the vTPM state the host will boot (required for a VM with one)."""
        body = wire.dump_roll_request(kp, health_cert.public_bytes(serialization.Encoding.DER), vtpm_state_sha256)
        path = f"/KeyProtection/service/{version}/rolltransportkey"
        r = self._request("POST", path, content=body, headers={"content-type": "application/xml"})
        return wire.parse_roll_response(r.content, f"{self.base_url}{path}")

    def release(
        self, kp: bytes, host: Host, health_cert: x509.Certificate, vtpm_state_sha256: str | None = None
    ) -> bytes:
        """Key release as the host: RollTransportKey, then open the envelope with the host's encryption key."""
        _egress, released = self.roll_transport_key(kp, health_cert, vtpm_state_sha256=vtpm_state_sha256)
        return open_release(released, host.encryption_key, health_cert)

    def report_vtpm_state(
        self, kp: bytes, health_cert: x509.Certificate, previous: str, current: str, mac: str, version: str = "v1"
    ) -> tuple[str, int, str]:
        """POST a VtpmStateReport (hgs/ledger.py); returns the ledger's (vm id, generation, current)."""
        body = wire.dump_state_report(kp, health_cert.public_bytes(serialization.Encoding.DER), previous, current, mac)
        path = f"/KeyProtection/service/{version}/vtpmstate"
        r = self._request("POST", path, content=body, headers={"content-type": "application/xml"})
        return wire.parse_state_reply(r.content, f"{self.base_url}{path}")


__all__ = ["HgsClient"]
