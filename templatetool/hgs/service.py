"""The Host Guardian Service as a network service (Starlette app; docs/formats/hgs-service.md).

Endpoints ([MS-HGSA] attestation, [MS-KPS] key protection)::

    GET  /Attestation/Getinfo                              protocol info + a fresh server nonce
    POST /Attestation/v2.0/hostkeyattest                   AttestationRequest -> HealthCertificateReply
    GET  /Attestation/v2.0/signingCertificates             the attestation signer certificate(s)
    GET  /KeyProtection/service/metadata/2014-07/metadata.xml   signed guardian metadata
    POST /KeyProtection/service/{version}/rolltransportkey RollTransportKeyRequest -> ...Response

Attestation reuses :mod:`templatetool.hgs.attest` (the offline checks) against the policy in the
:class:`~templatetool.hgs.store.Store`, and adds a single-use server nonce bound into the signed
evidence. Key release reuses :func:`templatetool.hgs.release.release_key` and additionally
requires a health certificate this service (any node sharing the store) issued. Every refusal is
a documented ErrorReply / KPS fault with a 4xx status; private keys come from the guardian
folder's files and never reach the database, a log line or a reply other than enveloped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import FormatError, IntegrityError, PolicyError, ResourceError, TemplateToolError, UsageError
from . import wire
from .attest import AttestationPolicy, HealthCheck, attest, health_fingerprint, load_attestation
from .ledger import STATE_CODE, state_mac, vm_state_keys
from .release import release_key
from .store import Store, default_url

log = logging.getLogger("templatetool.hgs.service")

XML = "application/xml"
JSON = "application/json"


def _starlette() -> Any:
    try:
        import starlette  # noqa: F401
    except ImportError:
        raise ResourceError(
            "the HGS service needs Starlette and uvicorn", hint="pip install 'templatetool[hgs]'"
        ) from None


@dataclass
class ServiceState:
    """What a running service holds: the attestation signer, the fabric guardian (private keys), the store."""

    signer_key: Any
    signer_cert: x509.Certificate
    guardian: Any
    metadata_xml: bytes
    store: Store


def load_service_state(
    guardian_dir: str | os.PathLike[str],
    db_url: str | None = None,
    *,
    password_env: str | None = None,
    node: str = "hgs",
) -> ServiceState:
    """Open a guardian folder (``hgs init`` done, private keys present) and the state store.

    The store's schema is created or checked, and the folder's ``attestation.json`` merged into it.
    """
    from ..guardian import export_metadata
    from ..guardian.model import load_guardian

    key, cert = load_attestation(guardian_dir)
    g = load_guardian(guardian_dir, private=True, password_env=password_env)
    store = Store(db_url or default_url(guardian_dir), node=node)
    store.migrate()
    if (Path(guardian_dir) / "attestation.json").exists():
        store.import_policy(AttestationPolicy.load(guardian_dir))
    if g.signing_key is None:
        raise FormatError(
            "the guardian folder has no signing private key",
            str(guardian_dir),
            "`hgs serve` needs the guardian's private keys",
        )
    xml = export_metadata(g, g.signing_key, g.signing_certificate)
    return ServiceState(key, cert, g, xml, store)


def quote_qualifying(nonce: str, credential: bytes) -> bytes:
    """TPM2_Quote qualifying data of TPM mode: SHA-256(nonce UTF-8 || activated credential)."""
    return hashlib.sha256(nonce.encode() + credential).digest()


def _evidence_body(evidence: bytes) -> dict[str, Any]:
    try:
        body = json.loads(evidence)["evidence"]
        if not isinstance(body, dict) or not isinstance(body.get("nonce"), str):
            raise TypeError
        return body
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise FormatError("host evidence is malformed (no nonce)", "AttestationRequest.Evidence") from None


def _same_key(a: Any, b: Any) -> bool:
    f = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(serialization.Encoding.DER, f) == b.public_bytes(serialization.Encoding.DER, f))


def _host_of(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    v = str(cn[0].value) if cn else ""
    return v[len("Health ") :] if v.startswith("Health ") else v


class Service:
    """The request handlers (synchronous; the app runs them in a thread pool)."""

    def __init__(self, state: ServiceState) -> None:
        self.s = state

    # -- attestation ---------------------------------------------------------------------------
    def getinfo(self) -> bytes:
        nonce, exp = self.s.store.new_nonce()
        pol = self.s.store.policy()
        return wire.dump_wcf(
            "GetInfoReply",
            {
                "ProtocolVersions": [wire.PROTOCOL_VERSION],
                "AttestationModes": ["HostKey", "TpmTrusted"],
                "Nonce": nonce,
                "NonceExpires": exp.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "HealthCertificateHours": pol.health_hours,
            },
        )

    def signing_certificates(self) -> bytes:
        der = self.s.signer_cert.public_bytes(serialization.Encoding.DER)
        return wire.dump_wcf("SigningCertificatesReply", {"Certificates": [wire.b64(der)]})

    def hostkeyattest(self, body: bytes) -> bytes:
        """Host-key mode: one round. TPM mode (evidence with a ``tpm`` section): round 1 (EkPublic,
        AkPublic) returns a TpmChallengeReply; round 2 adds Credential, Quote and QuoteSignature."""
        where = "AttestationRequest"
        _name, m = wire.parse_wcf(body, "AttestationRequest", where)
        evidence = wire.b64_member(m, "Evidence", where)
        host = None
        extra: list[HealthCheck] = []
        try:
            doc = _evidence_body(evidence)
            nonce = doc["nonce"]
            host = str(doc.get("host"))[:64]
            if doc.get("tpm") is not None:
                if "Quote" not in m:
                    return self._tpm_challenge(m, evidence, doc, nonce)
                self.s.store.consume_nonce(nonce)
                extra = self._check_quote(m, evidence, doc, nonce)
            else:
                self.s.store.consume_nonce(nonce)
            hc, checks = attest(
                self.s.store.policy(),
                evidence,
                self.s.signer_key,
                self.s.signer_cert,
                where="AttestationRequest.Evidence",
            )
        except TemplateToolError as e:
            if not isinstance(e, ResourceError):
                self.s.store.audit("attest", "refused", str(e), host=host)
            raise
        checks = extra + checks
        fp = health_fingerprint(hc)
        self.s.store.record_attestation(
            fp,
            _host_of(hc),
            hc.not_valid_before_utc,
            hc.not_valid_after_utc,
            "; ".join(f"{c.name}: ok" for c in checks),
        )
        return wire.dump_wcf(
            "HealthCertificateReply",
            {
                "HealthCertificate": wire.b64(hc.public_bytes(serialization.Encoding.DER)),
                "ValidFrom": hc.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "ValidTo": hc.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Checks": [{"Name": c.name, "Passed": c.passed, "Detail": c.detail} for c in checks],
            },
        )

    def _tpm_challenge(self, m: dict[str, Any], evidence: bytes, doc: dict[str, Any], nonce: str) -> bytes:
        """Round 1 of TPM mode: MakeCredential for the (registered) EK and the AK's Name."""
        from .host import load_public
        from .store import NONCE_SECONDS
        from .tpmquote import make_credential, parse_ak_public, parse_ek_public

        where = "AttestationRequest"
        self.s.store.open_nonce(nonce)
        ek = parse_ek_public(wire.b64_member(m, "EkPublic", where, 4096), f"{where}.EkPublic")
        _ak_key, ak_name = parse_ak_public(wire.b64_member(m, "AkPublic", where, 4096), f"{where}.AkPublic")
        try:
            ev_ek = load_public(str(doc["tpm"].get("ek_public") or ""), "EK public key", f"{where}.Evidence")
        except AttributeError:
            raise FormatError("host evidence tpm section is malformed", f"{where}.Evidence") from None
        if not _same_key(ev_ek, ek.public_key):
            raise IntegrityError("EkPublic is not the EK the evidence names", f"{where}.EkPublic")
        pol = self.s.store.policy()
        if not any(_same_key(load_public(pem, "EK", n), ek.public_key) for n, pem in pol.tpm_hosts.items()):
            raise PolicyError(
                "attestation failed: TPM endorsement key registered: EK not registered with this guardian",
                f"{where}.EkPublic",
                "register the host's EK with this guardian",
                code="hgs.ek-unregistered",
            )
        if not pol.pcr_baseline:
            raise PolicyError("attestation failed: PCR baseline: this guardian has no PCR baseline configured", where)
        credential = os.urandom(32)
        blob, secret = make_credential(ek, ak_name, credential)
        self.s.store.put_challenge(
            nonce,
            ak_name,
            hashlib.sha256(credential).hexdigest(),
            hashlib.sha256(evidence).hexdigest(),
            _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=NONCE_SECONDS),
        )
        return wire.dump_wcf(
            "TpmChallengeReply",
            {
                "CredentialBlob": wire.b64(blob),
                "EncryptedSecret": wire.b64(secret),
                "PcrBank": pol.pcr_bank,
                "Pcrs": sorted(pol.pcr_baseline),
            },
        )

    def _check_quote(self, m: dict[str, Any], evidence: bytes, doc: dict[str, Any], nonce: str) -> list[HealthCheck]:
        """Round 2 of TPM mode: the activated credential, then the quote against the replayed log."""
        from ..tpm.algs import bank_id
        from ..tpm.eventlog import replay_log
        from .tpmquote import parse_ak_public, verify_quote

        where = "AttestationRequest"
        ch = self.s.store.take_challenge(nonce)
        if ch is None:
            raise PolicyError(
                "no credential challenge is open for this nonce",
                where,
                "send round 1 (EkPublic, AkPublic) first, with a fresh nonce",
            )
        ak_key, ak_name = parse_ak_public(wire.b64_member(m, "AkPublic", where, 4096), f"{where}.AkPublic")
        if ak_name != ch[0]:
            raise IntegrityError("the AK is not the one the credential challenge was made for", f"{where}.AkPublic")
        if hashlib.sha256(evidence).hexdigest() != ch[2]:
            raise IntegrityError("round 2 evidence differs from round 1", f"{where}.Evidence")
        credential = wire.b64_member(m, "Credential", where, 64)
        if not hmac.compare_digest(hashlib.sha256(credential).hexdigest(), ch[1]):
            raise IntegrityError(
                "the credential does not answer the challenge (ActivateCredential by another EK or AK?)",
                f"{where}.Credential",
            )
        try:
            rep = replay_log(base64.b64decode(str(doc["tpm"].get("tcg_log", "")), validate=True))
        except (ValueError, TypeError, AttributeError):
            raise FormatError("the evidence TCG log is not base64", f"{where}.Evidence") from None
        values = {bank_id(b): v for b, v in rep.values_by_bank.items()}
        sel = verify_quote(
            ak_key,
            wire.b64_member(m, "Quote", where, 4096),
            wire.b64_member(m, "QuoteSignature", where, 4096),
            quote_qualifying(nonce, credential),
            values,
            f"{where}.Quote",
        )
        pol = self.s.store.policy()
        missing = sorted(set(pol.pcr_baseline) - set(sel.get(bank_id(pol.pcr_bank), [])))
        if missing:
            raise PolicyError(
                f"attestation failed: TPM quote: the quote does not cover baseline "
                f"{pol.pcr_bank} PCR(s) {', '.join(map(str, missing))}",
                f"{where}.Quote",
            )
        return [
            HealthCheck("AK certified by the EK", True, "ActivateCredential answered the challenge"),
            HealthCheck(
                "TPM quote", True, "signed by the AK over this round's nonce; quoted PCRs equal the replayed TCG log"
            ),
        ]

    # -- key protection -----------------------------------------------------------------------
    def rolltransportkey(self, body: bytes, at: _dt.datetime | None = None) -> bytes:
        from ..kp import URN_CMS_AEAD

        where = "RollTransportKeyRequest"
        kp, hc_der, named_state = wire.parse_roll_request(body, where)
        kp_fp = hashlib.sha256(kp).hexdigest()
        hc_fp = hashlib.sha256(hc_der).hexdigest()
        host = None
        ledger_note: list[str] = []

        def check_state(secret: bytes) -> None:
            vk = vm_state_keys(secret)
            if vk is None:
                return
            if named_state is None:
                raise UsageError(
                    "this VM has a vTPM state: the request must name the state the host will boot (VtpmStateSha256)",
                    where,
                )
            rec = self.s.store.vm_state(vk.vm_id)
            latest, gen = rec if rec is not None else (vk.initial_sha256, 0)
            if named_state != latest:
                raise IntegrityError(
                    f"the vTPM state named is not the latest the fabric recorded for this VM (generation {gen}): "
                    "an older or forked copy of its state",
                    f"{where}.VtpmStateSha256",
                    "start the VM from its latest vTPM state",
                    code=STATE_CODE,
                )
            ledger_note.append(f"; vTPM state generation {gen} {latest[:16]}")

        try:
            hc = self._health_certificate(hc_der, hc_fp, where)
            host = self.s.store.health_certificate_host(hc_fp)
            released = release_key(
                kp, hc, self.s.guardian, self.s.signer_cert, at=at, where=f"{where}.IngressProtector", check=check_state
            )
        except TemplateToolError as e:
            if not isinstance(e, ResourceError):
                self.s.store.audit(
                    "release",
                    "refused",
                    str(e),
                    host=host or _safe_host(hc_der),
                    health_certificate=hc_fp,
                    key_protector=kp_fp,
                )
            raise
        self.s.store.audit(
            "release",
            "granted",
            f"KP unwrapped by guardian {self.s.guardian.name!r}; key enveloped to the health certificate"
            + "".join(ledger_note),
            host=host,
            health_certificate=hc_fp,
            key_protector=kp_fp,
        )
        # Egress protector: our KP format needs the owner's GuardianSignature, which the service cannot
        # make, so the egress protector is the ingress protector (no roll; docs/formats/hgs-service.md).
        return wire.dump_roll_response(kp, released, URN_CMS_AEAD)

    def _health_certificate(self, hc_der: bytes, hc_fp: str, where: str) -> x509.Certificate:
        """The request's health certificate, if it parses and this service (any node) issued it."""
        try:
            hc = x509.load_der_x509_certificate(hc_der)
        except ValueError:
            raise FormatError("the health certificate is not DER X.509", f"{where}.HealthCertificate") from None
        if self.s.store.health_certificate_host(hc_fp) is None:
            raise PolicyError(
                "health certificate was not issued by this service",
                f"{where}.HealthCertificate",
                "attest with POST /Attestation/v2.0/hostkeyattest first",
            )
        return hc

    def vtpmstate(self, body: bytes, at: _dt.datetime | None = None) -> bytes:
        """A host's report of a VM's new vTPM state (hgs/ledger.py): checked like a release (health
        certificate of this fabric, KP this guardian unwraps), the step MACed under the VM's K, then
        the ledger advances from its latest state only."""
        from ..kp import unwrap
        from .attest import verify_health_certificate

        where = "VtpmStateReport"
        kp, hc_der, prev, cur, mac = wire.parse_state_report(body, where)
        kp_fp = hashlib.sha256(kp).hexdigest()
        hc_fp = hashlib.sha256(hc_der).hexdigest()
        host = None
        try:
            hc = self._health_certificate(hc_der, hc_fp, where)
            host = self.s.store.health_certificate_host(hc_fp)
            verify_health_certificate(hc, self.s.signer_cert, at=at)
            vk = vm_state_keys(unwrap(kp, self.s.guardian))
            if vk is None:
                raise UsageError("the key protector's secret is not a VM secret with a vTPM state", where)
            if not hmac.compare_digest(state_mac(vk.key, vk.vm_id, prev, cur), mac):
                raise IntegrityError(
                    "vTPM state report refused: its MAC does not verify under the VM's key", f"{where}.Mac"
                )
            gen = self.s.store.advance_vm_state(vk.vm_id, prev, cur, vk.initial_sha256, host)
        except TemplateToolError as e:
            if not isinstance(e, ResourceError):
                self.s.store.audit(
                    "vtpm-state", "refused", str(e), host=host, health_certificate=hc_fp, key_protector=kp_fp
                )
            raise
        self.s.store.audit(
            "vtpm-state",
            "granted",
            f"vTPM state generation {gen}: {prev[:16]} -> {cur[:16]}",
            host=host,
            health_certificate=hc_fp,
            key_protector=kp_fp,
        )
        return wire.dump_state_reply(vk.vm_id, gen, cur)


def _safe_host(hc_der: bytes) -> str | None:
    try:
        return _host_of(x509.load_der_x509_certificate(hc_der))
    except ValueError:
        return None


async def _read_body(request: Any) -> bytes:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > wire.MAX_BODY:
        raise FormatError(f"body too large ({cl} bytes, limit {wire.MAX_BODY})", "request")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > wire.MAX_BODY:
            raise FormatError(f"body too large (limit {wire.MAX_BODY} bytes)", "request")
    return bytes(buf)


def create_app(state: ServiceState) -> Any:
    """The Starlette application serving one guardian's attestation and key protection endpoints."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    svc = Service(state)

    def wcf_error(e: TemplateToolError) -> Response:
        name = wire.error_reply_name(e)
        return Response(wire.dump_error(name, type(e).__name__, str(e)), wire.ERROR_STATUS[name], media_type=JSON)

    def kps_error(e: TemplateToolError) -> Response:
        code = wire.fault_code(e)
        return Response(wire.dump_fault(code, str(e)), wire.KPS_FAULT_STATUS[code], media_type=XML)

    async def guarded(fn: Any, on_error: Callable[[TemplateToolError], Response], *args: Any) -> Response:
        try:
            resp: Response = await run_in_threadpool(fn, *args)
            return resp
        except TemplateToolError as e:
            log.info("refused: %s", e)
            return on_error(e)

    async def getinfo(request: Request) -> Response:
        return await guarded(lambda: Response(svc.getinfo(), media_type=JSON), wcf_error)

    async def signing(request: Request) -> Response:
        return await guarded(lambda: Response(svc.signing_certificates(), media_type=JSON), wcf_error)

    def posted(
        handler: Callable[[bytes], bytes], media_type: str, on_error: Callable[[TemplateToolError], Response]
    ) -> Callable[[Request], Any]:
        """A POST endpoint: read the bounded body, run ``handler`` on it in the thread pool."""

        async def endpoint(request: Request) -> Response:
            try:
                body = await _read_body(request)
            except TemplateToolError as e:
                return on_error(e)
            return await guarded(lambda: Response(handler(body), media_type=media_type), on_error)

        return endpoint

    hostkeyattest = posted(svc.hostkeyattest, JSON, wcf_error)
    roll = posted(svc.rolltransportkey, XML, kps_error)
    vtpmstate = posted(svc.vtpmstate, XML, kps_error)

    async def metadata(request: Request) -> Response:
        return Response(state.metadata_xml, media_type=XML)

    async def http_error(request: Request, exc: Any) -> Response:
        status = getattr(exc, "status_code", 404)
        if request.url.path.startswith("/KeyProtection"):
            code = "InvalidRequestException"
            return Response(
                wire.dump_fault(code, f"HTTP {status}: {request.method} {request.url.path}"[:200]),
                status,
                media_type=XML,
            )
        name = "NotFoundErrorReply" if status == 404 else "InvalidRequestErrorReply"
        return Response(
            wire.dump_error(name, f"Http{status}", f"{request.method} {request.url.path}"[:200]),
            status,
            media_type=JSON,
        )

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("internal error handling %s: %s", request.url.path, type(exc).__name__)
        return Response(wire.dump_error("ServiceErrorReply", "InternalError", "internal error"), 500, media_type=JSON)

    routes = [
        Route("/Attestation/Getinfo", getinfo, methods=["GET"]),
        Route("/Attestation/v2.0/hostkeyattest", hostkeyattest, methods=["POST"]),
        Route("/Attestation/v2.0/signingCertificates", signing, methods=["GET"]),
        Route("/KeyProtection/service/metadata/2014-07/metadata.xml", metadata, methods=["GET"]),
        Route("/KeyProtection/service/{version}/rolltransportkey", roll, methods=["POST"]),
        Route("/KeyProtection/service/{version}/vtpmstate", vtpmstate, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal})
    app.state.hgs = state
    return app


__all__ = ["Service", "ServiceState", "create_app", "load_service_state"]
