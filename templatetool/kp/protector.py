"""[MS-KPS] key protector XML: create, inspect, grant, revoke, unwrap (spec in docs/formats/kp.md).

A KP carries one secret (the transport key; later the vTPM key) for an owner and any number of
guardians::

    <Protector xmlns="http://schemas.microsoft.com/kps/2014/07">
      <Wrappings>
        <Wrapping>                                    one per owner/guardian
          <Id>n</Id>
          <SigningCertificate>b64 DER</SigningCertificate>
          <SigningCertificateSignature ParentWrappingId="owner Id"><Signature Algorithm=..>..</Signature></...>
          <EncryptionCertificate>b64 DER</EncryptionCertificate>
          <EncryptionCertificateSignature><Signature Algorithm=..>..</Signature></...>
          <TransportKey><EncryptedData Algorithm=URN_CMS_AEAD><CipherValue>b64 CMS</CipherValue></EncryptedData></TransportKey>
        </Wrapping>
      </Wrappings>
      <TransportKeySignature>                         HMAC-SHA256 over exc-c14n(Wrappings), key = HKDF(secret)
        <KeyDerivationMethod Algorithm=URN_KDF/>
        <Signature Algorithm=hmac-sha256><SignatureValue>..</SignatureValue></Signature>
      </TransportKeySignature>
      <GuardianSignature WrappingId="owner Id"><Signature Algorithm=..>..</Signature></GuardianSignature>
    </Protector>

The transport key plaintext is a Payload_V1 (``structs.PayloadV1``) holding the secret, sealed
to each wrapping's encryption certificate as CMS AuthEnvelopedData (``cms.enveloped``).
The file is written in exclusive canonical XML form with no declaration, and readers refuse any
other byte form, so every altered byte is detected (the MAC and the owner's signature cover
Wrappings; the canonical-form and strict-schema checks cover the rest).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from typing import Any

from construct import ConstructError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from lxml import etree

from ..cms.enveloped import envelope, open_envelope
from ..errors import CredentialError, FormatError, IntegrityError, UsageError
from ..guardian import sigalg
from ..guardian.metadata import KPS_NS, parse_xml
from ..guardian.model import Guardian, check_usage, describe_certificate
from ..signers.certs import thumbprint
from .structs import PAYLOAD_HEADER_SIZE, PayloadV1

_K = f"{{{KPS_NS}}}"
#: TransportKey/EncryptedData: CMS AuthEnvelopedData (RFC 5083, id-ct-authEnvelopedData) to one recipient.
URN_CMS_AEAD = "urn:oid:1.2.840.113549.1.9.16.1.23"
#: KeyDerivationMethod: HKDF-SHA256 (RFC 5869), empty salt, info KDF_INFO, 32-byte output.
URN_KDF = "urn:x-templatetool:kps:kdf:hkdf-sha256:v1"
KDF_INFO = b"templatetool KP TransportKeySignature v1"
#: TransportKeySignature/Signature: HMAC-SHA256 (RFC 4051).
HMAC_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#hmac-sha256"
MIN_SECRET = 16
MAX_SECRET = 64 * 1024
_UINT_RE = re.compile(r"^(0|[1-9][0-9]{0,9})$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _c14n(el: etree._Element) -> bytes:
    return bytes(etree.tostring(el, method="c14n", exclusive=True, with_comments=False))


def _mac_key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KDF_INFO).derive(secret)


def _mac(secret: bytes, wrappings_c14n: bytes) -> bytes:
    return hmac.new(_mac_key(secret), wrappings_c14n, "sha256").digest()


def _payload(secret: bytes) -> bytes:
    out: bytes = PayloadV1.build(
        {
            "DataSize": PAYLOAD_HEADER_SIZE + len(secret),
            "NumberOfKeys": 1,
            "KeyLength": len(secret),
            "KeyValue": [secret],
        }
    )
    return out


def _parse_payload(data: bytes, where: str) -> bytes:
    try:
        p = PayloadV1.parse(data)
    except (ConstructError, ValueError):
        raise IntegrityError("the transport key payload is malformed", where) from None
    if p.DataSize != len(data) or p.NumberOfKeys != 1 or PAYLOAD_HEADER_SIZE + p.KeyLength != len(data):
        raise IntegrityError("the transport key payload has inconsistent sizes", where)
    return bytes(p.KeyValue[0])


# ------------------------------------------------------------------------------------------------
# Parsed model
# ------------------------------------------------------------------------------------------------


@dataclass
class Wrapping:
    """One wrapping of a KP (owner or guardian)."""

    id: int
    signing_certificate: x509.Certificate
    parent_id: int
    signing_signature: tuple[str, bytes]
    encryption_certificate: x509.Certificate
    encryption_signature: tuple[str, bytes]
    transport_key: bytes  # CMS AuthEnvelopedData DER

    @property
    def is_owner(self) -> bool:
        return self.parent_id == self.id

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": "owner" if self.is_owner else "guardian",
            "parent": self.parent_id,
            "signing_certificate": describe_certificate(self.signing_certificate),
            "encryption_certificate": describe_certificate(self.encryption_certificate),
        }


@dataclass
class Protector:
    """A parsed and signature-checked key protector (the MAC needs the secret: see :func:`unwrap`)."""

    wrappings: list[Wrapping]
    wrappings_c14n: bytes
    mac: bytes
    guardian_signature_id: int

    @property
    def owner(self) -> Wrapping:
        return next(w for w in self.wrappings if w.is_owner)


def _only(parent: etree._Element, name: str, where: str) -> etree._Element:
    kids = [c for c in parent if isinstance(c.tag, str)]
    if len(kids) != 1 or kids[0].tag != _K + name:
        raise FormatError(f"<{etree.QName(parent).localname}> must contain exactly <{name}>", where)
    return kids[0]


def _children(parent: etree._Element, names: list[str], where: str) -> list[etree._Element]:
    kids = [c for c in parent if isinstance(c.tag, str)]
    got = [etree.QName(c).localname if c.tag.startswith(_K) else c.tag for c in kids]
    if got != names or any(not c.tag.startswith(_K) for c in kids):
        raise FormatError(f"<{etree.QName(parent).localname}> has children {got}, expected {names}", where)
    return kids


def _no_text(el: etree._Element, where: str) -> None:
    for node in el.iter():
        if not isinstance(node.tag, str):
            raise FormatError("comments or processing instructions are not allowed in a KP", where)
        if len(node) and node.text and node.text.strip():
            raise FormatError(f"unexpected text in <{etree.QName(node).localname}>", where)
        if node.tail and node.tail.strip():
            raise FormatError(f"unexpected text after <{etree.QName(node).localname}>", where)


def _attrs(el: etree._Element, allowed: set[str], where: str) -> None:
    extra = set(el.attrib) - allowed
    if extra:
        raise FormatError(f"unexpected attributes {sorted(extra)} on <{etree.QName(el).localname}>", where)


def _uint(text: str | None, what: str, where: str) -> int:
    if text is None or not _UINT_RE.match(text) or int(text) > 0xFFFFFFFF:
        raise FormatError(f"{what} is not an unsigned 32-bit integer", where)
    return int(text)


def _unb64(text: str | None, what: str, where: str) -> bytes:
    try:
        return base64.b64decode(text or "", validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64", where) from None


def _cert(el: etree._Element, what: str, where: str) -> x509.Certificate:
    _attrs(el, set(), where)
    try:
        cert = x509.load_der_x509_certificate(_unb64(el.text, what, where))
        cert.public_key()  # parsed lazily: a damaged key must fail here
        return cert
    except Exception:
        raise FormatError(f"{what} is not a valid X.509 certificate", where) from None


def _signature(el: etree._Element, where: str) -> tuple[str, bytes]:
    """Parse a Signature_T element: Algorithm attribute + SignatureValue."""
    _attrs(el, {"Algorithm"}, where)
    sv = _only(el, "SignatureValue", where)
    _attrs(sv, set(), where)
    return el.get("Algorithm") or "", _unb64(sv.text, "SignatureValue", where)


def parse_kp(data: bytes, where: str = "key protector") -> Protector:
    """Parse a KP and check everything that needs no private key.

    Canonical form, strict schema, certificates, the wrapping chain to a single owner, every
    SigningCertificateSignature and EncryptionCertificateSignature, and the owner's
    GuardianSignature over Wrappings. Raises FormatError / IntegrityError.
    """
    root = parse_xml(data, where)
    if root.tag != _K + "Protector":
        raise FormatError(
            f"not a key protector (root element {root.tag})", where, "expected <Protector> in the [MS-KPS] namespace"
        )
    if _c14n(root) != data:
        raise IntegrityError(
            "the key protector is not in canonical form", where, "it was altered or re-formatted after it was written"
        )
    _attrs(root, set(), where)
    _no_text(root, where)
    wr_el, tks_el, gs_el = _children(root, ["Wrappings", "TransportKeySignature", "GuardianSignature"], where)
    _attrs(wr_el, set(), where)
    wrappings: list[Wrapping] = []
    for w in wr_el:
        if w.tag != _K + "Wrapping":
            raise FormatError("<Wrappings> may only contain <Wrapping>", where)
        _attrs(w, set(), where)
        id_el, sc_el, scs_el, ec_el, ecs_el, tk_el = _children(
            w,
            [
                "Id",
                "SigningCertificate",
                "SigningCertificateSignature",
                "EncryptionCertificate",
                "EncryptionCertificateSignature",
                "TransportKey",
            ],
            where,
        )
        _attrs(id_el, set(), where)
        wid = _uint(id_el.text, "Wrapping Id", where)
        _attrs(scs_el, {"ParentWrappingId"}, where)
        parent = _uint(scs_el.get("ParentWrappingId"), "ParentWrappingId", where)
        _attrs(ecs_el, set(), where)
        _attrs(tk_el, set(), where)
        ed = _only(tk_el, "EncryptedData", where)
        _attrs(ed, {"Algorithm"}, where)
        if ed.get("Algorithm") != URN_CMS_AEAD:
            raise FormatError(
                f"unsupported TransportKey algorithm {ed.get('Algorithm')!r}",
                where,
                f"this reader supports {URN_CMS_AEAD}",
            )
        cv = _only(ed, "CipherValue", where)
        _attrs(cv, set(), where)
        wrappings.append(
            Wrapping(
                wid,
                _cert(sc_el, "SigningCertificate", where),
                parent,
                _signature(_only(scs_el, "Signature", where), where),
                _cert(ec_el, "EncryptionCertificate", where),
                _signature(_only(ecs_el, "Signature", where), where),
                _unb64(cv.text, "CipherValue", where),
            )
        )
    if not wrappings:
        raise FormatError("the key protector has no wrappings", where)
    by_id = {w.id: w for w in wrappings}
    if len(by_id) != len(wrappings):
        raise FormatError("duplicate Wrapping Id", where)
    owners = [w for w in wrappings if w.is_owner]
    if len(owners) != 1:
        raise IntegrityError(f"a key protector needs exactly one owner wrapping (found {len(owners)})", where)
    owner = owners[0]
    for w in wrappings:
        seen = {w.id}
        cur = w
        while not cur.is_owner:
            if cur.parent_id not in by_id or cur.parent_id in seen:
                raise IntegrityError(f"wrapping {w.id} does not chain to the owner", where)
            seen.add(cur.parent_id)
            cur = by_id[cur.parent_id]
        parent_w = by_id[w.parent_id]
        sigalg.verify_bytes(
            parent_w.signing_certificate.public_key(),
            *w.signing_signature,
            _der(w.signing_certificate),
            f"SigningCertificateSignature of wrapping {w.id}",
            where,
        )
        sigalg.verify_bytes(
            w.signing_certificate.public_key(),
            *w.encryption_signature,
            _der(w.encryption_certificate),
            f"EncryptionCertificateSignature of wrapping {w.id}",
            where,
        )
    _attrs(tks_el, set(), where)
    kdm, tsig = _children(tks_el, ["KeyDerivationMethod", "Signature"], where)
    _attrs(kdm, {"Algorithm"}, where)
    if kdm.get("Algorithm") != URN_KDF or len(kdm):
        raise FormatError(f"unsupported KeyDerivationMethod {kdm.get('Algorithm')!r}", where, f"expected {URN_KDF}")
    mac_alg, mac = _signature(tsig, where)
    if mac_alg != HMAC_SHA256 or len(mac) != 32:
        raise FormatError(f"unsupported TransportKeySignature algorithm {mac_alg!r}", where, f"expected {HMAC_SHA256}")
    _attrs(gs_el, {"WrappingId"}, where)
    gs_id = _uint(gs_el.get("WrappingId"), "GuardianSignature WrappingId", where)
    if gs_id != owner.id:
        raise IntegrityError("the GuardianSignature is not the owner's", where)
    wrappings_c14n = _c14n(wr_el)
    gs_alg, gs_val = _signature(_only(gs_el, "Signature", where), where)
    sigalg.verify_bytes(
        owner.signing_certificate.public_key(), gs_alg, gs_val, wrappings_c14n, "the owner's GuardianSignature", where
    )
    return Protector(wrappings, wrappings_c14n, mac, gs_id)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def _sig(parent: etree._Element, tag: str, key: Any, data: bytes, **attrs: str) -> None:
    alg, value = sigalg.sign_bytes(key, data)
    holder = etree.SubElement(parent, _K + tag, **attrs)
    s = etree.SubElement(holder, _K + "Signature", Algorithm=alg)
    etree.SubElement(s, _K + "SignatureValue").text = _b64(value)


def _add_wrapping(
    wr_el: etree._Element,
    wid: int,
    parent_id: int,
    parent_key: Any,
    g_signing: x509.Certificate,
    g_encryption: x509.Certificate,
    ecs_sig: tuple[str, bytes] | None,
    g_signing_key: Any,
    payload: bytes,
) -> None:
    w = etree.SubElement(wr_el, _K + "Wrapping")
    etree.SubElement(w, _K + "Id").text = str(wid)
    etree.SubElement(w, _K + "SigningCertificate").text = _b64(_der(g_signing))
    _sig(w, "SigningCertificateSignature", parent_key, _der(g_signing), ParentWrappingId=str(parent_id))
    etree.SubElement(w, _K + "EncryptionCertificate").text = _b64(_der(g_encryption))
    holder = etree.SubElement(w, _K + "EncryptionCertificateSignature")
    if ecs_sig is None:
        ecs_sig = sigalg.sign_bytes(g_signing_key, _der(g_encryption))
    s = etree.SubElement(holder, _K + "Signature", Algorithm=ecs_sig[0])
    etree.SubElement(s, _K + "SignatureValue").text = _b64(ecs_sig[1])
    tk = etree.SubElement(w, _K + "TransportKey")
    ed = etree.SubElement(tk, _K + "EncryptedData", Algorithm=URN_CMS_AEAD)
    etree.SubElement(ed, _K + "CipherValue").text = _b64(envelope(payload, [g_encryption]))


def _guardian_ecs(g: Guardian) -> tuple[str, bytes] | None:
    """The EncryptionCertificateSignature for a guardian: made now when we hold its signing key,
    else the one recorded from its signed metadata (checked here)."""
    if g.signing_key is not None:
        return sigalg.sign_bytes(g.signing_key, _der(g.encryption_certificate))
    if g.encryption_signature is not None:
        sigalg.verify_bytes(
            g.signing_certificate.public_key(),
            *g.encryption_signature,
            _der(g.encryption_certificate),
            f"EncryptionCertificateSignature of guardian {g.name!r}",
            g.path or g.name,
        )
        return g.encryption_signature
    return None


def _finish(wr_el: etree._Element, owner: Guardian, owner_id: int, secret: bytes) -> bytes:
    root = etree.Element(_K + "Protector", nsmap={None: KPS_NS})
    root.append(wr_el)
    wr_c14n = _c14n(wr_el)
    tks = etree.SubElement(root, _K + "TransportKeySignature")
    etree.SubElement(tks, _K + "KeyDerivationMethod", Algorithm=URN_KDF)
    s = etree.SubElement(tks, _K + "Signature", Algorithm=HMAC_SHA256)
    etree.SubElement(s, _K + "SignatureValue").text = _b64(_mac(secret, wr_c14n))
    _sig(root, "GuardianSignature", owner.signing_key, wr_c14n, WrappingId=str(owner_id))
    return _c14n(root)


def _need_owner_keys(owner: Guardian, what: str) -> None:
    if owner.signing_key is None:
        raise CredentialError(
            f"{what} needs the owner's private signing key",
            owner.path,
            "give the owner guardian folder that holds its keys",
        )


def _check_new_guardian(g: Guardian) -> None:
    check_usage(g.signing_certificate, "signing", f"guardian {g.name!r}")
    check_usage(g.encryption_certificate, "encryption", f"guardian {g.name!r}")


def _ecs_for(g: Guardian, existing: dict[bytes, tuple[str, bytes]]) -> tuple[str, bytes]:
    sig = _guardian_ecs(g)
    if sig is None:
        sig = existing.get(_der(g.encryption_certificate))
    if sig is None:
        raise UsageError(
            f"no EncryptionCertificateSignature for guardian {g.name!r}",
            hint="import the guardian from its signed HGS metadata (guardian import)",
        )
    return sig


def create_kp(
    secret: bytes,
    owner: Guardian,
    guardians: list[Guardian],
    ecs_signatures: dict[bytes, tuple[str, bytes]] | None = None,
) -> bytes:
    """Create a KP carrying ``secret`` for ``owner`` (needs its signing key) and ``guardians``.

    Each wrapping's EncryptionCertificateSignature is the guardian's own signing key over its
    encryption certificate: made now for guardians whose keys we hold, otherwise taken from the
    guardian (``Guardian.encryption_signature``, verified by ``import_metadata``) or from
    ``ecs_signatures`` (keyed by encryption certificate DER).
    """
    if not isinstance(secret, (bytes, bytearray)) or not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise UsageError(f"the KP secret must be {MIN_SECRET}..{MAX_SECRET} bytes", hint="use a random key")
    _need_owner_keys(owner, "creating a key protector")
    _check_new_guardian(owner)
    existing = dict(ecs_signatures or {})
    payload = _payload(bytes(secret))
    wr = etree.Element(_K + "Wrappings")
    owner_id = 1
    _add_wrapping(
        wr,
        owner_id,
        owner_id,
        owner.signing_key,
        owner.signing_certificate,
        owner.encryption_certificate,
        None,
        owner.signing_key,
        payload,
    )
    seen = {_der(owner.encryption_certificate)}
    for i, g in enumerate(guardians, start=2):
        _check_new_guardian(g)
        if _der(g.encryption_certificate) in seen:
            raise UsageError(f"guardian {g.name!r} is given twice", hint="list each guardian once")
        seen.add(_der(g.encryption_certificate))
        _add_wrapping(
            wr,
            i,
            owner_id,
            owner.signing_key,
            g.signing_certificate,
            g.encryption_certificate,
            _ecs_for(g, existing),
            None,
            payload,
        )
    return _finish(wr, owner, owner_id, bytes(secret))


def _wrapping_matches(w: Wrapping, g: Guardian) -> bool:
    return _der(w.encryption_certificate) == _der(g.encryption_certificate)


def _open(p: Protector, w: Wrapping, g: Guardian, where: str) -> bytes:
    if g.encryption_key is None:
        raise CredentialError(
            f"guardian {g.name!r} has no private encryption key here",
            g.path,
            "give the guardian folder that holds its keys",
        )
    secret = _parse_payload(
        open_envelope(w.transport_key, g.encryption_key, g.encryption_certificate, where=f"{where}: wrapping {w.id}"),
        where,
    )
    if not hmac.compare_digest(_mac(secret, p.wrappings_c14n), p.mac):
        raise IntegrityError(
            "the TransportKeySignature (MAC over Wrappings) does not verify", where, "the key protector was altered"
        )
    return secret


def unwrap(data: bytes, guardian: Guardian, where: str = "key protector") -> bytes:
    """Recover the secret with a guardian's (or the owner's) private encryption key.

    CredentialError when the guardian has no wrapping (never granted, or revoked); IntegrityError
    on any tampering (signatures, envelope tag, MAC).
    """
    p = parse_kp(data, where)
    for w in p.wrappings:
        if _wrapping_matches(w, guardian):
            return _open(p, w, guardian, where)
    raise CredentialError(
        f"guardian {guardian.name!r} has no wrapping in this key protector",
        where,
        "it was never granted access or was revoked",
    )


def _rebuild(p: Protector, owner: Guardian, secret: bytes, keep: list[Wrapping], add: Guardian | None) -> bytes:
    """Re-emit the wrappings (kept ones byte-identical in content), optionally add one, re-sign and re-MAC."""
    owner_w = p.owner
    wr = etree.Element(_K + "Wrappings")
    for w in keep:
        el = etree.SubElement(wr, _K + "Wrapping")
        etree.SubElement(el, _K + "Id").text = str(w.id)
        etree.SubElement(el, _K + "SigningCertificate").text = _b64(_der(w.signing_certificate))
        scs = etree.SubElement(el, _K + "SigningCertificateSignature", ParentWrappingId=str(w.parent_id))
        s = etree.SubElement(scs, _K + "Signature", Algorithm=w.signing_signature[0])
        etree.SubElement(s, _K + "SignatureValue").text = _b64(w.signing_signature[1])
        etree.SubElement(el, _K + "EncryptionCertificate").text = _b64(_der(w.encryption_certificate))
        ecs = etree.SubElement(el, _K + "EncryptionCertificateSignature")
        s = etree.SubElement(ecs, _K + "Signature", Algorithm=w.encryption_signature[0])
        etree.SubElement(s, _K + "SignatureValue").text = _b64(w.encryption_signature[1])
        tk = etree.SubElement(el, _K + "TransportKey")
        ed = etree.SubElement(tk, _K + "EncryptedData", Algorithm=URN_CMS_AEAD)
        etree.SubElement(ed, _K + "CipherValue").text = _b64(w.transport_key)
    if add is not None:
        new_id = max(w.id for w in keep) + 1
        _add_wrapping(
            wr,
            new_id,
            owner_w.id,
            owner.signing_key,
            add.signing_certificate,
            add.encryption_certificate,
            _ecs_for(add, {}),
            None,
            _payload(secret),
        )
    return _finish(wr, owner, owner_w.id, secret)


def _owner_secret(p: Protector, owner: Guardian, where: str) -> bytes:
    _need_owner_keys(owner, "changing a key protector")
    ow = p.owner
    if _der(ow.signing_certificate) != _der(owner.signing_certificate) or not _wrapping_matches(ow, owner):
        raise CredentialError(
            f"guardian {owner.name!r} is not the owner of this key protector",
            where,
            "only the owner can grant or revoke (give the owner's folder)",
        )
    return _open(p, ow, owner, where)


def grant(data: bytes, owner: Guardian, guardian: Guardian, where: str = "key protector") -> bytes:
    """Add a wrapping for ``guardian`` (needs the owner's private keys). Returns the new KP."""
    p = parse_kp(data, where)
    secret = _owner_secret(p, owner, where)
    _check_new_guardian(guardian)
    if any(_wrapping_matches(w, guardian) for w in p.wrappings):
        raise UsageError(f"guardian {guardian.name!r} already has access", where)
    return _rebuild(p, owner, secret, p.wrappings, guardian)


def _wrapping_selected(w: Wrapping, sel: str) -> bool:
    t = sel.strip().replace(":", "").upper()
    for c in (w.signing_certificate, w.encryption_certificate):
        if t in (thumbprint(c, "sha1"), thumbprint(c, "sha256")):
            return True
        for attr in c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
            cn = str(attr.value)
            if cn == sel or cn.endswith(f" ({sel})"):
                return True
    return False


def revoke(data: bytes, owner: Guardian, guardian: str | Guardian, where: str = "key protector") -> bytes:
    """Remove the wrapping(s) of a guardian given by object, name or certificate thumbprint.

    The owner cannot be revoked. Note: a revoked guardian that saw the secret before still
    knows it; rotate the secret when that matters.
    """
    p = parse_kp(data, where)
    secret = _owner_secret(p, owner, where)
    if isinstance(guardian, Guardian):
        drop = [
            w
            for w in p.wrappings
            if _wrapping_matches(w, guardian) or _der(w.signing_certificate) == _der(guardian.signing_certificate)
        ]
        label = guardian.name
    else:
        drop = [w for w in p.wrappings if _wrapping_selected(w, guardian)]
        label = guardian
    if not drop:
        raise UsageError(f"no guardian {label!r} in this key protector", where, "see 'kp show' for the guardians")
    if any(w.is_owner for w in drop):
        raise UsageError("the owner cannot be revoked", where)
    dropped = {w.id for w in drop}
    keep = [w for w in p.wrappings if w.id not in dropped]
    for w in keep:  # a wrapping whose parent is dropped would no longer chain to the owner
        if w.parent_id in dropped:
            raise UsageError(f"wrapping {w.id} depends on a revoked guardian", where)
    return _rebuild(p, owner, secret, keep, None)


def inspect_kp(data: bytes, where: str = "key protector") -> dict[str, Any]:
    """Verify everything that needs no key and describe the KP (owner, guardians, algorithms)."""
    p = parse_kp(data, where)
    return {
        "format": "[MS-KPS] Protector",
        "owner": p.owner.describe(),
        "guardians": [w.describe() for w in p.wrappings if not w.is_owner],
        "algorithms": {
            "transport_key": URN_CMS_AEAD,
            "key_derivation": URN_KDF,
            "transport_key_signature": HMAC_SHA256,
            "guardian_signature": _signature_alg_of(p),
        },
        "verified": {
            "structure": True,
            "certificate_signatures": True,
            "owner_signature": True,
            "mac": "needs a guardian's or the owner's key (kp unwrap)",
        },
    }


def _signature_alg_of(p: Protector) -> str:
    key = p.owner.signing_certificate.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise FormatError("the owner's signing certificate has neither an RSA nor an EC key", "key protector")
    return sigalg.algorithm_for(key)
