"""CMS SignedData (RFC 5652) built with asn1crypto, signed and verified with ``cryptography``.

``sign_data`` produces DER ``ContentInfo{signedData}`` with one SignerInfo (issuerAndSerialNumber),
signed attributes content-type, message-digest and signing-time, and the signer certificate plus
chain embedded. Signature algorithms: RSA PKCS#1 v1.5 (rsaEncryption), RSASSA-PSS (MGF1 with the
same hash, salt = digest length) and ECDSA with SHA-256/384/512. The output verifies with
``openssl cms -verify -binary -inform DER -purpose any``.

``verify_signed_data`` checks the digest, the signature, the signer certificate's validity
period and key usage, and (when trust anchors are given) the chain up to an anchor.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import algos, cms, core
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..errors import FormatError, IntegrityError, PolicyError, TemplateToolError, UnsupportedError, UsageError
from ..signers.base import KeyAlgorithm, Signer

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass
class SignedDataInfo:
    """What :func:`verify_signed_data` established."""

    content: bytes
    signer_cert: x509.Certificate
    certificates: list[x509.Certificate] = field(default_factory=list)
    signing_time: _dt.datetime | None = None
    digest_algorithm: str = "sha256"
    signature_algorithm: str = ""
    content_type: str = "data"
    #: The trust anchor the chain ended at, when trust anchors were given.
    trust_anchor: x509.Certificate | None = None

    def to_json(self) -> dict[str, object]:
        from ..signers.certs import thumbprint

        return {
            "signer": self.signer_cert.subject.rfc4514_string(),
            "signer_thumbprint": thumbprint(self.signer_cert),
            "signing_time": self.signing_time.isoformat() if self.signing_time else None,
            "digest_algorithm": self.digest_algorithm,
            "signature_algorithm": self.signature_algorithm,
            "content_type": self.content_type,
            "certificates": [c.subject.rfc4514_string() for c in self.certificates],
            "trust_anchor": self.trust_anchor.subject.rfc4514_string() if self.trust_anchor else None,
        }


def _hash(name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[name]()
    except KeyError:
        raise UnsupportedError(f"digest {name!r} not supported", hint="use sha256, sha384 or sha512") from None


def _digest(data: bytes, name: str) -> bytes:
    h = hashes.Hash(_hash(name))
    h.update(data)
    return h.finalize()


def _a_cert(c: x509.Certificate) -> a_x509.Certificate:
    return a_x509.Certificate.load(c.public_bytes(_DER))


from cryptography.hazmat.primitives.serialization import Encoding as _Enc  # noqa: E402

_DER = _Enc.DER


def _attrs_der_sorted(attrs: list[cms.CMSAttribute]) -> cms.CMSAttributes:
    """A SET OF Attribute in DER order (sorted by encoding), as X.690 requires and OpenSSL re-checks."""
    ordered = sorted(attrs, key=lambda a: a.dump())
    return cms.CMSAttributes(ordered)


def sign_data(
    content: bytes,
    signer: Signer,
    *,
    detached: bool = False,
    pss: bool = False,
    digest: str = "sha256",
    content_type: str = "data",
    signing_time: _dt.datetime | None = None,
) -> bytes:
    """Return DER CMS SignedData over ``content`` signed by ``signer``.

    ``content_type`` is ``'data'`` or a dotted OID for the encapsulated content type.
    ``pss`` selects RSASSA-PSS for RSA keys (ignored for EC). ``detached`` omits the content.
    """
    if not isinstance(content, (bytes, bytearray)):
        raise UsageError("content must be bytes")
    if not isinstance(signer, Signer):
        raise UsageError(
            f"{type(signer).__name__} is not a Signer",
            hint="give an object with certificate, chain, key_algorithm and sign_raw()",
        )
    cert = signer.certificate
    hash_alg = _hash(digest)
    md = _digest(bytes(content), digest)
    when = (signing_time or _dt.datetime.now(_dt.UTC)).replace(microsecond=0)
    if when.year < 2050:
        st = cms.Time({"utc_time": core.UTCTime(when)})
    else:
        st = cms.Time({"generalized_time": core.GeneralizedTime(when)})
    ctype = cms.ContentType(content_type)
    signed_attrs = _attrs_der_sorted(
        [
            cms.CMSAttribute({"type": "content_type", "values": [ctype]}),
            cms.CMSAttribute({"type": "message_digest", "values": [md]}),
            cms.CMSAttribute({"type": "signing_time", "values": [st]}),
        ]
    )
    to_sign = signed_attrs.dump()  # universal SET tag: what the signature covers (RFC 5652 §5.4)

    pub = cert.public_key()
    key_alg = signer.key_algorithm
    if isinstance(pub, rsa.RSAPublicKey) != key_alg.is_rsa or isinstance(pub, ec.EllipticCurvePublicKey) != (
        key_alg == KeyAlgorithm.ECDSA
    ):
        raise UsageError("the signer's key type does not match its certificate", signer.describe())
    if isinstance(pub, rsa.RSAPublicKey):
        if pss:
            use = KeyAlgorithm.RSA_PSS
            sig_alg = algos.SignedDigestAlgorithm(
                {
                    "algorithm": "rsassa_pss",
                    "parameters": algos.RSASSAPSSParams(
                        {
                            "hash_algorithm": {"algorithm": digest},
                            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": digest}},
                            "salt_length": hash_alg.digest_size,
                            "trailer_field": "trailer_field_bc",
                        }
                    ),
                }
            )
        else:
            use = KeyAlgorithm.RSA_PKCS1
            sig_alg = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})
        signature = signer.sign_raw(to_sign, hash_alg, algorithm=use)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        signature = signer.sign_raw(to_sign, hash_alg, algorithm=KeyAlgorithm.ECDSA)
        sig_alg = algos.SignedDigestAlgorithm({"algorithm": f"{digest}_ecdsa"})
    else:
        raise UnsupportedError(f"unsupported signer key {type(pub).__name__}", hint="use RSA or EC")

    a_cert = _a_cert(cert)
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": a_cert.issuer, "serial_number": a_cert.serial_number}
                    )
                }
            ),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest}),
            "signed_attrs": signed_attrs,
            "signature_algorithm": sig_alg,
            "signature": signature,
        }
    )
    encap: dict[str, object] = {"content_type": ctype}
    if not detached:
        encap["content"] = bytes(content)
    sd = cms.SignedData(
        {
            "version": "v1" if content_type == "data" else "v3",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": digest})],
            "encap_content_info": encap,
            "certificates": [a_cert] + [_a_cert(c) for c in signer.chain],
            "signer_infos": [signer_info],
        }
    )
    der: bytes = cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump(force=True)
    return der


def _as_utc(t: _dt.datetime) -> _dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


def _check_validity(c: x509.Certificate, at: _dt.datetime, role: str) -> None:
    if at < c.not_valid_before_utc:
        raise PolicyError(
            f"{role} certificate is not yet valid (from {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)",
            c.subject.rfc4514_string(),
            "check the clock or the certificate",
        )
    if at > c.not_valid_after_utc:
        raise PolicyError(
            f"{role} certificate expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            c.subject.rfc4514_string(),
            "re-sign with a valid certificate",
        )


def _check_signing_ku(c: x509.Certificate) -> None:
    try:
        ku = c.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not (ku.digital_signature or ku.content_commitment):
        raise PolicyError(
            "signer certificate key usage does not allow signing (no digitalSignature)",
            c.subject.rfc4514_string(),
            "use a certificate made for signing",
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def build_chain(
    leaf: x509.Certificate,
    pool: list[x509.Certificate],
    trust: list[x509.Certificate],
    at: _dt.datetime,
    max_depth: int = 8,
) -> x509.Certificate:
    """Validate the path leaf → … → anchor (:func:`templatetool.pki.verify_chain`); return the anchor.

    The signer certificate may itself be a trust anchor (pinned). Raises PolicyError when no
    valid path exists (non-CA issuer, missing keyCertSign, expired CA, path length ...).
    """
    from ..pki import verify_chain

    return verify_chain(
        leaf, pool, trust, at=at, where="CMS signer", what="signer certificate", max_depth=max_depth
    ).anchor


def _check_embedded_certificates(certs: list[x509.Certificate], where: str) -> None:
    """Every embedded certificate must verify against an embedded issuer (or itself).

    A certificate whose issuer is not embedded is accepted here only when its Authority Key
    Identifier names a different key (a CA outside the message: judged by the trust step);
    one with no AKI or an AKI equal to its own SKI claims to be self-signed and must verify so.
    """
    for c in certs:
        issuers = [i for i in certs if i.subject == c.issuer]
        if not issuers:
            try:
                aki = c.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
            except x509.ExtensionNotFound:
                aki = None
            try:
                ski = c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
            except x509.ExtensionNotFound:
                ski = None
            if aki is not None and aki != ski:
                continue  # issued by a CA outside the message
            issuers = [c]
        if not any(_issued_by(c, i) for i in issuers):
            raise IntegrityError(
                "an embedded certificate's signature does not verify",
                where + ": " + c.subject.rfc4514_string(),
                "the certificate was altered",
            )


def _verify(
    der: bytes,
    *,
    content: bytes | None = None,
    trust: list[x509.Certificate] | None = None,
    at: _dt.datetime | None = None,
) -> SignedDataInfo:
    """The body of :func:`verify_signed_data` (which maps stray parser exceptions to FormatError)."""
    where = "CMS SignedData"
    try:
        ci = cms.ContentInfo.load(bytes(der), strict=True)
        if ci["content_type"].native != "signed_data":
            raise FormatError(f"not a SignedData (content type {ci['content_type'].native})", where)
        sd = ci["content"]
        encap = sd["encap_content_info"]
        ctype = encap["content_type"].dotted if encap["content_type"].native not in ("data",) else "data"
        embedded = encap["content"]
        embedded_bytes = None if isinstance(embedded, core.Void) or embedded.native is None else embedded.contents
        # asn1crypto's ParsableOctetString keeps the raw octets in .contents (primitive encoding).
        if embedded_bytes is not None and embedded.method == 1:  # constructed (BER) octet string
            embedded_bytes = embedded.native
        cert_objs = [c.chosen for c in sd["certificates"]] if sd["certificates"].native is not None else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. non-positive serials: judged by the checks below
            certs = [x509.load_der_x509_certificate(c.dump()) for c in cert_objs if isinstance(c, a_x509.Certificate)]
        sis = list(sd["signer_infos"])
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError(f"malformed CMS SignedData: {e}", where) from None
    # Fields outside the signed attributes are not covered by the signature: hold them to
    # the one form we accept so that no byte of a signed catalog can change unnoticed.
    try:
        strict = cms.ContentInfo.load(bytes(der)).dump(force=True) == bytes(der)
    except (ValueError, TypeError):
        strict = False
    if not strict:
        raise FormatError("the SignedData is not in DER form (altered or non-canonical encoding)", where)
    if len(sis) != 1:
        raise UnsupportedError(f"{len(sis)} signer infos (exactly one is supported)", where)
    if sd["version"].native not in ("v1", "v3") or sis[0]["version"].native not in ("v1", "v3"):
        raise FormatError("unexpected SignedData/SignerInfo version", where)
    if [a["algorithm"].native for a in sd["digest_algorithms"]] != [sis[0]["digest_algorithm"]["algorithm"].native]:
        raise FormatError("SignedData digest algorithms do not match the signer's", where)
    _check_embedded_certificates(certs, where)
    if content is not None and embedded_bytes is not None and bytes(content) != embedded_bytes:
        raise IntegrityError("the given content differs from the signed content", where)
    data = embedded_bytes if embedded_bytes is not None else (bytes(content) if content is not None else None)
    if data is None:
        raise UsageError("detached signature: the signed content is needed", where)
    si = sis[0]
    try:
        dig_name = si["digest_algorithm"]["algorithm"].native
        sid = si["sid"]
        if sid.name == "issuer_and_serial_number":
            iss = sid.chosen["issuer"].dump()
            serial = sid.chosen["serial_number"].native
            cands = [
                c
                for c in certs
                if c.serial_number == serial and a_x509.Name.load(c.issuer.public_bytes()).dump() == iss
            ]
        else:
            skid = sid.chosen.native
            cands = []
            for c in certs:
                try:
                    if c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == skid:
                        cands.append(c)
                except x509.ExtensionNotFound:
                    pass
        sa = si["signed_attrs"]
        if isinstance(sa, core.Void) or not len(sa):
            raise UnsupportedError("SignerInfo without signed attributes", where)
        attrs: dict[str, list[Any]] = {}  # attribute name -> asn1crypto SetOf values (untyped)
        for a in sa:
            attrs.setdefault(a["type"].native, []).append(a["values"])
        sa_der = b"\x31" + sa.dump()[1:]  # re-tag [0] IMPLICIT as SET OF: what was signed
        sig_alg = si["signature_algorithm"]
        sig_name = sig_alg["algorithm"].native
        signature = si["signature"].native
    except (ValueError, TypeError, KeyError) as e:
        raise FormatError(f"malformed SignerInfo: {e}", where) from None
    if not cands:
        raise FormatError("the signer certificate is not embedded", where)
    signer_cert = cands[0]
    for name in ("content_type", "message_digest"):
        if len(attrs.get(name, [])) != 1 or len(attrs[name][0]) != 1:
            raise IntegrityError(f"signed attribute {name} missing or repeated", where)
    attr_ct = attrs["content_type"][0][0]
    if attr_ct.dotted != encap["content_type"].dotted:
        raise IntegrityError("signed content-type attribute differs from the content type", where)
    if _digest(data, dig_name) != attrs["message_digest"][0][0].native:
        raise IntegrityError("content digest mismatch: the signed content was changed", where)
    signing_time = None
    if "signing_time" in attrs:
        signing_time = attrs["signing_time"][0][0].native
    h = _hash(dig_name)
    pub = signer_cert.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            if sig_name == "rsassa_pss":
                p = sig_alg["parameters"]
                ph = p["hash_algorithm"]["algorithm"].native
                mh = p["mask_gen_algorithm"]["parameters"]["algorithm"].native
                salt = p["salt_length"].native
                pub.verify(signature, sa_der, padding.PSS(padding.MGF1(_hash(mh)), salt), _hash(ph))
            elif sig_name in ("rsassa_pkcs1v15", f"{dig_name}_rsa"):
                pub.verify(signature, sa_der, padding.PKCS1v15(), h)
            else:
                raise UnsupportedError(f"signature algorithm {sig_name} not supported", where)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            if sig_name not in ("ecdsa", f"{dig_name}_ecdsa", "sha256_ecdsa", "sha384_ecdsa", "sha512_ecdsa"):
                raise UnsupportedError(f"signature algorithm {sig_name} not supported", where)
            eh = _hash(sig_name.split("_")[0]) if sig_name != "ecdsa" else h
            pub.verify(signature, sa_der, ec.ECDSA(eh))
        else:
            raise UnsupportedError(f"signer key type {type(pub).__name__} not supported", where)
    except InvalidSignature:
        raise IntegrityError(
            "the CMS signature does not verify", where, "the catalog or its signature was altered"
        ) from None
    when = _as_utc(at) if at else _dt.datetime.now(_dt.UTC)
    _check_validity(signer_cert, when, "signer")
    _check_signing_ku(signer_cert)
    anchor = None
    if trust:
        anchor = build_chain(signer_cert, [c for c in certs if c is not signer_cert], list(trust), when)
    return SignedDataInfo(
        content=data,
        signer_cert=signer_cert,
        certificates=certs,
        signing_time=signing_time,
        digest_algorithm=dig_name,
        signature_algorithm=sig_name,
        content_type=ctype,
        trust_anchor=anchor,
    )


def verify_signed_data(
    der: bytes,
    *,
    content: bytes | None = None,
    trust: list[x509.Certificate] | None = None,
    at: _dt.datetime | None = None,
) -> SignedDataInfo:
    """Verify a DER CMS SignedData; return what it holds and who signed it.

    ``content`` is required for detached signatures (and, when given for an attached one, must
    equal the embedded content). ``trust``: anchors the signer must chain to (None: any signer).
    ``at``: the time certificate validity is judged at (default: now).
    Failures: FormatError (malformed), IntegrityError (digest/signature), PolicyError (validity,
    key usage, trust).
    """
    try:
        return _verify(der, content=content, trust=trust, at=at)
    except TemplateToolError:
        raise
    except Exception as e:
        raise FormatError(f"malformed CMS SignedData: {type(e).__name__}: {e}", "CMS SignedData") from None


__all__ = ["SignedDataInfo", "build_chain", "sign_data", "verify_signed_data"]
