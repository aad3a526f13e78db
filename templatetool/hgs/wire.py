"""Wire formats of the HGS network service (docs/formats/hgs-service.md).

[MS-HGSA] attestation messages are WCF JSON: an object whose **first** member is ``__type``
(``"Name:#Namespace"``), then the data members. [MS-KPS] key release messages are XML in the KPS
namespace. Parsing is strict (size limit, no duplicate members, ``__type`` first and expected,
base64 validated, XML without DTDs or entities); every refusal is a :class:`FormatError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from lxml import etree

from ..canonical import no_duplicate_keys
from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    NotFoundError,
    PolicyError,
    TemplateToolError,
    UsageError,
)
from ..guardian.metadata import KPS_NS, parse_xml

#: WCF data contract namespace of our attestation messages (the part after ``:#`` in ``__type``).
WCF_NS = "Microsoft.Windows.RemoteAttestation.Core"
#: Largest request body either service accepts (evidence with a TCG log, a KP).
MAX_BODY = 4 << 20
PROTOCOL_VERSION = "2.0"

#: ErrorReply subtypes ([MS-HGSA] style) and the HTTP status each is sent with.
ERROR_STATUS = {
    "InvalidRequestErrorReply": 400,  # malformed JSON, wrong __type, bad base64, bad evidence
    "NonceErrorReply": 403,  # unknown, expired or already used server nonce
    "AttestationErrorReply": 403,  # a failed check (unknown host, PCR baseline, quote, credential ...)
    "NotFoundErrorReply": 404,  # unknown route
    "ServiceErrorReply": 503,  # state store unavailable
}
#: [MS-KPS] fault codes of RollTransportKey and the HTTP status of each.
KPS_FAULT_STATUS = {
    "InvalidRequestException": 400,  # malformed request XML
    "InvalidProtectorException": 400,  # KP malformed or tampered (signatures, MAC, canonical form)
    "InvalidWrappingException": 403,  # this guardian has no wrapping in the KP
    "HealthCertificateException": 403,  # health certificate not ours, expired, not a health cert
    "VtpmStateException": 409,  # ours: the vTPM state is not the latest in the ledger (rollback, fork)
    "ServiceException": 503,
}

_K = f"{{{KPS_NS}}}"


# -------------------------------------------------------------------------------------------
# WCF JSON
# -------------------------------------------------------------------------------------------


def wcf_type(name: str) -> str:
    """The ``__type`` value of a message name."""
    return f"{name}:#{WCF_NS}"


def dump_wcf(name: str, members: dict[str, Any]) -> bytes:
    """Serialize a WCF JSON object with ``__type`` as its first member."""
    if "__type" in members:
        raise ValueError("__type is added by dump_wcf")
    obj = {"__type": wcf_type(name), **members}
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_wcf(body: bytes, expected: str | tuple[str, ...], where: str = "request") -> tuple[str, dict[str, Any]]:
    """Parse a WCF JSON object; returns (message name, members without ``__type``).

    ``expected`` names the accepted message type(s). FormatError when the body is too large, not a
    JSON object, has duplicate members, ``__type`` is missing or not first, or names another type.
    """
    if len(body) > MAX_BODY:
        raise FormatError(f"body too large ({len(body)} bytes, limit {MAX_BODY})", where)
    try:
        obj = json.loads(body, object_pairs_hook=no_duplicate_keys)
    except FormatError as e:
        raise FormatError(f"malformed JSON: {e.what}", where) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"malformed JSON: {str(e)[:120]}", where) from None
    if not isinstance(obj, dict):
        raise FormatError("the body is not a JSON object", where)
    keys = list(obj)
    if not keys or keys[0] != "__type":
        raise FormatError("WCF JSON needs __type as the first member", where)
    t = obj.pop("__type")
    names = (expected,) if isinstance(expected, str) else expected
    for n in names:
        if t == wcf_type(n):
            return n, obj
    raise FormatError(f"unexpected message type {str(t)[:80]!r}", where, f"expected {wcf_type(names[0])}")


def b64_member(members: dict[str, Any], name: str, where: str, limit: int = MAX_BODY) -> bytes:
    """A required base64 string member, decoded."""
    v = members.get(name)
    if not isinstance(v, str):
        raise FormatError(f"member {name} is missing or not a string", where)
    if len(v) > limit * 4 // 3 + 4:
        raise FormatError(f"member {name} is too large", where)
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"member {name} is not valid base64", where) from None


def b64(data: bytes) -> str:
    """Base64 text."""
    return base64.b64encode(data).decode("ascii")


def error_reply_name(e: TemplateToolError) -> str:
    """The ErrorReply subtype for an error raised while handling an attestation request."""
    if isinstance(e, PolicyError) and "nonce" in e.what:
        return "NonceErrorReply"
    if isinstance(e, (PolicyError, CredentialError, IntegrityError)):
        return "AttestationErrorReply"
    if isinstance(e, NotFoundError):
        return "NotFoundErrorReply"
    if isinstance(e, (FormatError, UsageError)):
        return "InvalidRequestErrorReply"
    return "ServiceErrorReply"


def dump_error(name: str, code: str, message: str) -> bytes:
    """An ErrorReply subtype as WCF JSON."""
    return dump_wcf(name, {"ErrorCode": code, "Message": message[:500]})


# -------------------------------------------------------------------------------------------
# [MS-KPS] RollTransportKey XML
# -------------------------------------------------------------------------------------------


def _c14n(el: etree._Element) -> bytes:
    out: bytes = etree.tostring(el, method="c14n", exclusive=True)
    return out


def _text_child(parent: etree._Element, name: str, where: str) -> str:
    found = [c for c in parent if isinstance(c.tag, str) and c.tag == _K + name]
    if len(found) != 1:
        raise FormatError(f"<{parent.tag.split('}')[-1]}> needs exactly one <{name}>", where)
    return found[0].text or ""


def _unb64(text: str, what: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64", where) from None


def dump_roll_request(ingress_kp: bytes, health_cert_der: bytes, vtpm_state_sha256: str | None = None) -> bytes:
    """A RollTransportKeyRequest: the VM's KP (ingress protector) and the host's health certificate;
    for a VM with a vTPM state, our extension element ``VtpmStateSha256`` names the state the host
    will boot (the ledger, hgs/ledger.py)."""
    root = etree.Element(_K + "RollTransportKeyRequest", nsmap={None: KPS_NS})
    etree.SubElement(root, _K + "IngressProtector").text = b64(ingress_kp)
    etree.SubElement(root, _K + "HealthCertificate").text = b64(health_cert_der)
    if vtpm_state_sha256 is not None:
        etree.SubElement(root, _K + "VtpmStateSha256").text = vtpm_state_sha256
    return _c14n(root)


def parse_roll_request(body: bytes, where: str = "RollTransportKeyRequest") -> tuple[bytes, bytes, str | None]:
    """(ingress KP bytes, health certificate DER, named vTPM state SHA-256 or None) from a
    RollTransportKeyRequest."""
    from .ledger import check_digest

    root = _kps_root(body, "RollTransportKeyRequest", where)
    state = None
    if root.find(_K + "VtpmStateSha256") is not None:
        state = check_digest(_text_child(root, "VtpmStateSha256", where).strip(), "VtpmStateSha256", where)
    return (
        _unb64(_text_child(root, "IngressProtector", where), "IngressProtector", where),
        _unb64(_text_child(root, "HealthCertificate", where), "HealthCertificate", where),
        state,
    )


def _kps_root(body: bytes, name: str, where: str) -> etree._Element:
    if len(body) > MAX_BODY:
        raise FormatError(f"body too large ({len(body)} bytes, limit {MAX_BODY})", where)
    root = parse_xml(body, where)
    if root.tag != _K + name:
        raise FormatError(f"expected <{name}> in {KPS_NS}, got {str(root.tag)[:80]}", where)
    return root


#: The fields of a VtpmStateReport (our extension: the vTPM state ledger, hgs/ledger.py).
STATE_REPORT_FIELDS = ("Previous", "Current", "Mac")


def dump_state_report(ingress_kp: bytes, health_cert_der: bytes, previous: str, current: str, mac: str) -> bytes:
    """A VtpmStateReport: the VM's KP, the reporting host's health certificate and the ledger step."""
    root = etree.Element(_K + "VtpmStateReport", nsmap={None: KPS_NS})
    etree.SubElement(root, _K + "IngressProtector").text = b64(ingress_kp)
    etree.SubElement(root, _K + "HealthCertificate").text = b64(health_cert_der)
    for name, value in zip(STATE_REPORT_FIELDS, (previous, current, mac), strict=True):
        etree.SubElement(root, _K + name).text = value
    return _c14n(root)


def parse_state_report(body: bytes, where: str = "VtpmStateReport") -> tuple[bytes, bytes, str, str, str]:
    """(KP, health certificate DER, previous, current, mac) from a VtpmStateReport."""
    from .ledger import check_digest

    root = _kps_root(body, "VtpmStateReport", where)
    prev, cur, mac = (check_digest(_text_child(root, n, where).strip(), n, f"{where}.{n}") for n in STATE_REPORT_FIELDS)
    return (
        _unb64(_text_child(root, "IngressProtector", where), "IngressProtector", where),
        _unb64(_text_child(root, "HealthCertificate", where), "HealthCertificate", where),
        prev,
        cur,
        mac,
    )


def dump_state_reply(vm: str, generation: int, current: str) -> bytes:
    """A VtpmStateReply: the ledger's entry for the VM after the report."""
    root = etree.Element(_K + "VtpmStateReply", nsmap={None: KPS_NS})
    etree.SubElement(root, _K + "Vm").text = vm
    etree.SubElement(root, _K + "Generation").text = str(generation)
    etree.SubElement(root, _K + "Current").text = current
    return _c14n(root)


def parse_state_reply(body: bytes, where: str = "VtpmStateReply") -> tuple[str, int, str]:
    """(vm id, generation, current) from a VtpmStateReply (a fault raises its typed error)."""
    root = parse_xml(body, where)
    if root.tag == _K + "Fault":
        raise_fault(root, where)
    if root.tag != _K + "VtpmStateReply":
        raise FormatError(f"unexpected response element {str(root.tag)[:80]}", where)
    try:
        gen = int(_text_child(root, "Generation", where))
    except ValueError:
        raise FormatError("VtpmStateReply.Generation is not a number", where) from None
    return _text_child(root, "Vm", where), gen, _text_child(root, "Current", where)


def dump_roll_response(egress_kp: bytes, encrypted_keys: bytes, algorithm: str) -> bytes:
    """A RollTransportKeyResponse: the egress protector and the keys enveloped to the health certificate."""
    root = etree.Element(_K + "RollTransportKeyResponse", nsmap={None: KPS_NS})
    etree.SubElement(root, _K + "EgressProtector").text = b64(egress_kp)
    etree.SubElement(root, _K + "EncryptedTransportKeys", Algorithm=algorithm).text = b64(encrypted_keys)
    return _c14n(root)


def parse_roll_response(body: bytes, where: str = "RollTransportKeyResponse") -> tuple[bytes, bytes]:
    """(egress KP, encrypted transport keys) from a RollTransportKeyResponse."""
    root = parse_xml(body, where)
    if root.tag == _K + "Fault":
        raise_fault(root, where)
    if root.tag != _K + "RollTransportKeyResponse":
        raise FormatError(f"unexpected response element {str(root.tag)[:80]}", where)
    return (
        _unb64(_text_child(root, "EgressProtector", where), "EgressProtector", where),
        _unb64(_text_child(root, "EncryptedTransportKeys", where), "EncryptedTransportKeys", where),
    )


def fault_code(e: TemplateToolError) -> str:
    """The [MS-KPS] fault code for an error raised during RollTransportKey (or a state report)."""
    if e.code == "hgs.vtpm-state":
        return "VtpmStateException"
    if "health certificate" in e.what or "not a health certificate" in e.what:
        return "HealthCertificateException"
    if isinstance(e, CredentialError):
        return "InvalidWrappingException"
    if isinstance(e, (IntegrityError,)):
        return "InvalidProtectorException"
    if isinstance(e, (FormatError, UsageError)):
        in_kp = "protector" in f"{e.what} {e.where or ''}".lower()
        return "InvalidProtectorException" if in_kp else "InvalidRequestException"
    if isinstance(e, PolicyError):
        return "HealthCertificateException"
    return "ServiceException"


def dump_fault(code: str, message: str) -> bytes:
    """A KPS fault document: ``<Fault><Code/><Message/></Fault>``."""
    root = etree.Element(_K + "Fault", nsmap={None: KPS_NS})
    etree.SubElement(root, _K + "Code").text = code
    etree.SubElement(root, _K + "Message").text = message[:500]
    return _c14n(root)


_FAULT_ERRORS: dict[str, type[TemplateToolError]] = {
    "InvalidRequestException": FormatError,
    "InvalidProtectorException": IntegrityError,
    "InvalidWrappingException": CredentialError,
    "HealthCertificateException": PolicyError,
    "VtpmStateException": IntegrityError,
}


def raise_fault(root: etree._Element, where: str) -> None:
    """Raise the typed error a KPS fault document stands for."""
    code = (root.findtext(_K + "Code") or "").strip()
    msg = (root.findtext(_K + "Message") or "").strip()
    from ..errors import ResourceError

    raise _FAULT_ERRORS.get(code, ResourceError)(
        f"key protection service refused: {code}: {msg}",
        where,
        code="hgs.vtpm-state" if code == "VtpmStateException" else None,
    )


_REPLY_ERRORS: dict[str, type[TemplateToolError]] = {
    "InvalidRequestErrorReply": FormatError,
    "NonceErrorReply": PolicyError,
    "AttestationErrorReply": PolicyError,
    "NotFoundErrorReply": NotFoundError,
}


def raise_error_reply(name: str, members: dict[str, Any], where: str) -> None:
    """Raise the typed error an ErrorReply subtype stands for."""
    from ..errors import ResourceError

    code = str(members.get("ErrorCode", ""))[:80]
    msg = str(members.get("Message", ""))[:500]
    raise _REPLY_ERRORS.get(name, ResourceError)(f"attestation service refused: {code}: {msg}", where)


__all__ = [
    "ERROR_STATUS",
    "KPS_FAULT_STATUS",
    "MAX_BODY",
    "WCF_NS",
    "b64",
    "b64_member",
    "dump_error",
    "dump_fault",
    "dump_roll_request",
    "dump_roll_response",
    "dump_state_reply",
    "dump_state_report",
    "dump_wcf",
    "error_reply_name",
    "fault_code",
    "parse_roll_request",
    "parse_roll_response",
    "parse_state_reply",
    "parse_state_report",
    "parse_wcf",
    "raise_error_reply",
    "raise_fault",
    "wcf_type",
]
