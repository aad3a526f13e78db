"""HGS guardian metadata XML ([MS-KPS] §6.4): export (signed) and import (verified).

Document (namespace ``http://schemas.microsoft.com/kps/2014/07``)::

    <Metadata Version="1">
      <GuardianInformation>
        <Version>1</Version>
        <EncryptionCertificate>base64 DER</EncryptionCertificate>
        <SigningCertificate>base64 DER</SigningCertificate>
        <EncryptionCertificateSignature Algorithm="URI"><SignatureValue>..</SignatureValue></EncryptionCertificateSignature>
        <SigningCertificateSelfSignature Algorithm="URI"><SignatureValue>..</SignatureValue></SigningCertificateSelfSignature>
        [<OtherSigningCertificates><Certificate>..</Certificate>...</OtherSigningCertificates>]
      </GuardianInformation>
      <ds:Signature>  (XML-DSig enveloped, exc-c14n, SHA-256, signer certificate in KeyInfo)
    </Metadata>

The certificate signatures are the guardian's signing key over the DER of the encryption
certificate and over the DER of the signing certificate itself (algorithm URIs in ``sigalg``).
The enveloped XML-DSig signature is built here (lxml exclusive c14n) and signed through the
:class:`~templatetool.signers.Signer` protocol, so PFX, PEM and PKCS#11 keys sign alike; it is
checked with signxml on import, and the tests check it independently with ``xmlsec1 --verify``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from lxml import etree

from ..errors import FormatError, IntegrityError, UnsupportedError, UsageError
from ..signers.base import KeyAlgorithm, KeySigner, Signer
from . import sigalg
from .core import Guardian, check_chain, check_usage, check_validity, validate_name

KPS_NS = "http://schemas.microsoft.com/kps/2014/07"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
METADATA_VERSION = "1"
_K = f"{{{KPS_NS}}}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None, what: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join((text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64", where) from None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _sig_element(parent: etree._Element, tag: str, key: sigalg.SigningKey, data: bytes) -> None:
    alg, value = sigalg.sign_bytes(key, data)
    el = etree.SubElement(parent, _K + tag, Algorithm=alg)
    etree.SubElement(el, _K + "SignatureValue").text = _b64(value)


_DS = f"{{{DS_NS}}}"
_EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_SHA256_URI = "http://www.w3.org/2001/04/xmlenc#sha256"


def _exc_c14n(el: etree._Element) -> bytes:
    out: bytes = etree.tostring(el, method="c14n", exclusive=True, with_comments=False)
    return out


def _signature_method(signer: Signer) -> str:
    """RSA PKCS#1 v1.5 SHA-256, or ECDSA SHA-256 (P-256) / SHA-384 (P-384)."""
    pub = signer.certificate.public_key()
    if signer.key_algorithm.is_rsa:
        return sigalg.RSA_SHA256
    if signer.key_algorithm != KeyAlgorithm.ECDSA or not isinstance(pub, ec.EllipticCurvePublicKey):
        raise UnsupportedError(f"unsupported signer key {type(pub).__name__}", signer.describe(), "use RSA or EC")
    return sigalg.algorithm_for(pub)


def _signature_value(signer: Signer, method: str, data: bytes) -> bytes:
    """The SignatureValue over ``data``; ECDSA as fixed-length r||s (RFC 4051 §3.3)."""
    if method == sigalg.RSA_SHA256:
        return signer.sign_raw(data, hashes.SHA256(), algorithm=KeyAlgorithm.RSA_PKCS1)
    h: hashes.HashAlgorithm = hashes.SHA384() if method == sigalg.ECDSA_SHA384 else hashes.SHA256()
    r, s = decode_dss_signature(signer.sign_raw(data, h, algorithm=KeyAlgorithm.ECDSA))
    pub = signer.certificate.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # _signature_method chose ECDSA for this key
    n = (pub.key_size + 7) // 8
    return r.to_bytes(n, "big") + s.to_bytes(n, "big")


def sign_enveloped(root: etree._Element, signer: Signer) -> None:
    """Append an enveloped XML-DSig ``ds:Signature`` to ``root`` (in place), made by ``signer``.

    Reference URI="" with the enveloped-signature and exclusive-c14n transforms, SHA-256 digest,
    SignedInfo canonicalised with exclusive c14n and signed through :meth:`Signer.sign_raw`;
    KeyInfo carries the signer certificate then its chain.
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(_exc_c14n(root))  # = the document after the enveloped-signature transform
    sig = etree.SubElement(root, _DS + "Signature", nsmap={"ds": DS_NS})
    si = etree.SubElement(sig, _DS + "SignedInfo")
    etree.SubElement(si, _DS + "CanonicalizationMethod", Algorithm=_EXC_C14N)
    method = _signature_method(signer)
    etree.SubElement(si, _DS + "SignatureMethod", Algorithm=method)
    ref = etree.SubElement(si, _DS + "Reference", URI="")
    transforms = etree.SubElement(ref, _DS + "Transforms")
    etree.SubElement(transforms, _DS + "Transform", Algorithm=_ENVELOPED)
    etree.SubElement(transforms, _DS + "Transform", Algorithm=_EXC_C14N)
    etree.SubElement(ref, _DS + "DigestMethod", Algorithm=_SHA256_URI)
    etree.SubElement(ref, _DS + "DigestValue").text = _b64(digest.finalize())
    etree.SubElement(sig, _DS + "SignatureValue").text = _b64(_signature_value(signer, method, _exc_c14n(si)))
    x509_data = etree.SubElement(etree.SubElement(sig, _DS + "KeyInfo"), _DS + "X509Data")
    for c in (signer.certificate, *signer.chain):
        etree.SubElement(x509_data, _DS + "X509Certificate").text = _b64(_der(c))


def export_metadata(
    g: Guardian,
    signer: Signer | sigalg.SigningKey,
    signer_cert: x509.Certificate | None = None,
    signer_chain: Sequence[x509.Certificate] = (),
) -> bytes:
    """Build and sign the guardian metadata XML for ``g`` (needs ``g.signing_key``).

    ``signer`` makes the enveloped XML-DSig signature: any :class:`~templatetool.signers.Signer`
    (PFX, PEM, PKCS#11 — HGS uses its communications certificate), or a private key with
    ``signer_cert`` (and ``signer_chain``), e.g. the guardian's own signing key.
    """
    if g.signing_key is None:
        raise UsageError(
            f"guardian {g.name!r} has no private signing key here",
            g.path,
            "export from the folder where the guardian was generated",
        )
    if isinstance(signer, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        if signer_cert is None:
            raise UsageError("a signing key needs its certificate", g.path)
        signer = KeySigner(signer, signer_cert, signer_chain)
    root = etree.Element(_K + "Metadata", nsmap={None: KPS_NS}, Version=METADATA_VERSION)
    gi = etree.SubElement(root, _K + "GuardianInformation")
    etree.SubElement(gi, _K + "Version").text = METADATA_VERSION
    etree.SubElement(gi, _K + "EncryptionCertificate").text = _b64(_der(g.encryption_certificate))
    etree.SubElement(gi, _K + "SigningCertificate").text = _b64(_der(g.signing_certificate))
    _sig_element(gi, "EncryptionCertificateSignature", g.signing_key, _der(g.encryption_certificate))
    _sig_element(gi, "SigningCertificateSelfSignature", g.signing_key, _der(g.signing_certificate))
    if g.other_signing_certificates:
        others = etree.SubElement(gi, _K + "OtherSigningCertificates")
        for c in g.other_signing_certificates:
            etree.SubElement(others, _K + "Certificate").text = _b64(_der(c))
    sign_enveloped(root, signer)
    out: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    return out


def safe_parser() -> etree.XMLParser:
    """An lxml parser with entity expansion, DTD loading and network access disabled."""
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=False
    )


def parse_xml(data: bytes, where: str) -> etree._Element:
    """Parse untrusted XML safely; FormatError on malformed input or a DOCTYPE."""
    try:
        root = etree.fromstring(data, safe_parser())
    except (etree.XMLSyntaxError, ValueError) as e:
        raise FormatError(f"malformed XML: {e}", where) from None
    if root is None or root.getroottree().docinfo.doctype:
        raise FormatError("XML with a DOCTYPE is not accepted", where)
    return root


def _opt_child(parent: etree._Element, name: str, where: str) -> etree._Element | None:
    """The single ``name`` child of ``parent`` in the KPS namespace, None when absent."""
    found = parent.findall(_K + name)
    if len(found) > 1:
        raise FormatError(f"more than one <{name}>", where)
    return found[0] if found else None


def _child(parent: etree._Element, name: str, where: str) -> etree._Element:
    """The single, required ``name`` child of ``parent``."""
    el = _opt_child(parent, name, where)
    if el is None:
        raise FormatError(f"missing <{name}>", where)
    return el


def _cert(el: etree._Element, what: str, where: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(_unb64(el.text, what, where))
        cert.public_key()  # parsed lazily: a damaged key or name must fail here
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        return cert
    except Exception as e:
        raise FormatError(f"{what} is not a valid X.509 certificate: {e}", where) from None


def _check_sig(el: etree._Element, cert: x509.Certificate, data: bytes, what: str, where: str) -> None:
    alg = el.get("Algorithm") or ""
    value = _unb64(_child(el, "SignatureValue", where).text, f"{what} value", where)
    sigalg.verify_bytes(cert.public_key(), alg, value, data, what, where)


def import_metadata(
    data: bytes,
    name: str,
    where: str = "metadata",
    *,
    allow_untrusted_root: bool = False,
    allow_expired: bool = False,
    trust: Sequence[x509.Certificate] = (),
    at: _dt.datetime | None = None,
) -> Guardian:
    """Verify guardian metadata XML and return the guardian it describes (no private keys).

    Checks, in order: well-formed XML in the KPS namespace; the enveloped XML-DSig signature
    (signxml, pinned to the certificate in KeyInfo) — only the signed content is used afterwards;
    the metadata signer's chain (``trust``/``allow_untrusted_root``) and validity; both
    certificate signatures of GuardianInformation; usage and validity of both certificates and
    the signing certificate's chain. Tampering → IntegrityError.
    """
    validate_name(name)
    root = parse_xml(data, where)
    if root.tag != _K + "Metadata":
        raise FormatError(
            f"not guardian metadata (root element {root.tag})", where, "expected <Metadata> in the [MS-KPS] namespace"
        )
    sigs = root.findall(f"{{{DS_NS}}}Signature")
    if len(sigs) != 1:
        raise IntegrityError(
            "guardian metadata must carry exactly one XML signature", where, "the file is unsigned or was altered"
        )
    cert_els = sigs[0].findall(f".//{{{DS_NS}}}X509Certificate")
    if not cert_els:
        raise IntegrityError("the XML signature has no signer certificate", where)
    signer_cert = _cert(cert_els[0], "metadata signer certificate", where)
    chain = [_cert(e, "metadata signer chain certificate", where) for e in cert_els[1:]]
    from signxml.exceptions import InvalidInput, InvalidSignature
    from signxml.verifier import XMLVerifier

    try:
        result = XMLVerifier().verify(data, x509_cert=signer_cert, parser=safe_parser())
    except InvalidInput as e:
        raise FormatError(f"malformed XML signature: {e}", where) from None
    except InvalidSignature as e:
        raise IntegrityError(
            f"the metadata XML signature does not verify ({e})", where, "the file was altered after signing"
        ) from None
    except etree.XMLSyntaxError as e:
        raise FormatError(f"malformed XML: {e}", where) from None
    except etree.DocumentInvalid as e:  # signxml validates the ds:Signature against the XML-DSig schema
        raise FormatError(
            f"malformed XML signature (not valid XML-DSig): {e}",
            where,
            "the ds:Signature element was altered or is not standard XML-DSig",
        ) from None
    if isinstance(result, list):  # only with expect_references > 1, which we never ask for
        raise IntegrityError("the XML signature has more than one reference", where)
    signed = result.signed_xml
    if signed is None or signed.tag != _K + "Metadata":
        raise IntegrityError("the XML signature does not cover the Metadata document", where)
    check_validity(signer_cert, f"{where}: metadata signer", at, allow_expired)
    check_chain(
        signer_cert, f"{where}: metadata signer", chain, trust, allow_untrusted_root, at=at, allow_expired=allow_expired
    )
    gi = _child(signed, "GuardianInformation", where)
    ver = _child(gi, "Version", where).text
    if (ver or "").strip() != METADATA_VERSION or signed.get("Version") != METADATA_VERSION:
        raise FormatError(f"unsupported guardian metadata version {ver!r}", where)
    enc = _cert(_child(gi, "EncryptionCertificate", where), "EncryptionCertificate", where)
    sig = _cert(_child(gi, "SigningCertificate", where), "SigningCertificate", where)
    _check_sig(
        _child(gi, "SigningCertificateSelfSignature", where), sig, _der(sig), "SigningCertificateSelfSignature", where
    )
    ecs_el = _child(gi, "EncryptionCertificateSignature", where)
    _check_sig(ecs_el, sig, _der(enc), "EncryptionCertificateSignature", where)
    ecs = (ecs_el.get("Algorithm") or "", _unb64(_child(ecs_el, "SignatureValue", where).text, "signature", where))
    others_el = _opt_child(gi, "OtherSigningCertificates", where)
    others = (
        []
        if others_el is None
        else [_cert(c, "OtherSigningCertificates", where) for c in others_el.findall(_K + "Certificate")]
    )
    check_usage(sig, "signing", where)
    check_usage(enc, "encryption", where)
    for c in (sig, enc):
        check_validity(c, where, at, allow_expired)
    check_chain(sig, where, others, trust, allow_untrusted_root, at=at, allow_expired=allow_expired)
    return Guardian(name, sig, enc, other_signing_certificates=others, source="imported", encryption_signature=ecs)
