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
The enveloped XML-DSig signature is made and checked with signxml (no hand canonicalisation);
the tests check it independently with ``xmlsec1 --verify``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from ..errors import FormatError, IntegrityError, UsageError
from . import sigalg
from .model import Guardian, check_chain, check_usage, check_validity, validate_name

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


def _sig_element(parent, tag: str, key, data: bytes) -> None:
    alg, value = sigalg.sign_bytes(key, data)
    el = etree.SubElement(parent, _K + tag, Algorithm=alg)
    etree.SubElement(el, _K + "SignatureValue").text = _b64(value)


def export_metadata(g: Guardian, signer_key: sigalg.SigningKey, signer_cert: x509.Certificate,
                    signer_chain: list[x509.Certificate] = ()) -> bytes:
    """Build and sign the guardian metadata XML for ``g`` (needs ``g.signing_key``).

    ``signer_key``/``signer_cert`` make the enveloped XML-DSig signature (HGS uses its
    communications certificate; a guardian may sign with its own signing key).
    """
    if g.signing_key is None:
        raise UsageError(f"guardian {g.name!r} has no private signing key here", g.path,
                         "export from the folder where the guardian was generated")
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
    from signxml import (
        CanonicalizationMethod,
        DigestAlgorithm,
        SignatureMethod,
        XMLSigner,
    )

    alg = sigalg.algorithm_for(signer_key)
    method = {sigalg.RSA_SHA256: SignatureMethod.RSA_SHA256, sigalg.ECDSA_SHA256: SignatureMethod.ECDSA_SHA256,
              sigalg.ECDSA_SHA384: SignatureMethod.ECDSA_SHA384}[alg]
    signer = XMLSigner(signature_algorithm=method, digest_algorithm=DigestAlgorithm.SHA256,
                       c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0)
    signed = signer.sign(root, key=signer_key, cert=[signer_cert, *signer_chain])
    return etree.tostring(signed, xml_declaration=True, encoding="UTF-8")


def safe_parser() -> etree.XMLParser:
    """An lxml parser with entity expansion, DTD loading and network access disabled."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                           remove_comments=False)


def parse_xml(data: bytes, where: str) -> etree._Element:
    """Parse untrusted XML safely; FormatError on malformed input or a DOCTYPE."""
    try:
        root = etree.fromstring(data, safe_parser())
    except (etree.XMLSyntaxError, ValueError) as e:
        raise FormatError(f"malformed XML: {e}", where) from None
    if root is None or root.getroottree().docinfo.doctype:
        raise FormatError("XML with a DOCTYPE is not accepted", where)
    return root


def _child(parent, name: str, where: str, required: bool = True):
    found = parent.findall(_K + name)
    if len(found) > 1:
        raise FormatError(f"more than one <{name}>", where)
    if not found:
        if required:
            raise FormatError(f"missing <{name}>", where)
        return None
    return found[0]


def _cert(el, what: str, where: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(_unb64(el.text, what, where))
        cert.public_key()  # parsed lazily: a damaged key or name must fail here
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        return cert
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted certificate bytes is malformed input
        raise FormatError(f"{what} is not a valid X.509 certificate: {e}", where) from None


def _check_sig(el, cert: x509.Certificate, data: bytes, what: str, where: str) -> None:
    alg = el.get("Algorithm") or ""
    value = _unb64(_child(el, "SignatureValue", where).text, f"{what} value", where)
    sigalg.verify_bytes(cert.public_key(), alg, value, data, what, where)


def import_metadata(data: bytes, name: str, where: str = "metadata", *, allow_untrusted_root: bool = False,
                    allow_expired: bool = False, trust: list[x509.Certificate] = (),
                    at: _dt.datetime | None = None) -> Guardian:
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
        raise FormatError(f"not guardian metadata (root element {root.tag})", where,
                          "expected <Metadata> in the [MS-KPS] namespace")
    sigs = root.findall(f"{{{DS_NS}}}Signature")
    if len(sigs) != 1:
        raise IntegrityError("guardian metadata must carry exactly one XML signature", where,
                             "the file is unsigned or was altered")
    cert_els = sigs[0].findall(f".//{{{DS_NS}}}X509Certificate")
    if not cert_els:
        raise IntegrityError("the XML signature has no signer certificate", where)
    signer_cert = _cert(cert_els[0], "metadata signer certificate", where)
    chain = [_cert(e, "metadata signer chain certificate", where) for e in cert_els[1:]]
    from signxml import XMLVerifier
    from signxml.exceptions import InvalidInput, InvalidSignature

    try:
        result = XMLVerifier().verify(data, x509_cert=signer_cert, parser=safe_parser())
    except InvalidInput as e:
        raise FormatError(f"malformed XML signature: {e}", where) from None
    except InvalidSignature as e:
        raise IntegrityError(f"the metadata XML signature does not verify ({e})", where,
                             "the file was altered after signing") from None
    except etree.XMLSyntaxError as e:
        raise FormatError(f"malformed XML: {e}", where) from None
    except etree.DocumentInvalid as e:  # signxml validates the ds:Signature against the XML-DSig schema
        raise FormatError(f"malformed XML signature (not valid XML-DSig): {e}", where,
                          "the ds:Signature element was altered or is not standard XML-DSig") from None
    signed = result.signed_xml
    if signed is None or signed.tag != _K + "Metadata":
        raise IntegrityError("the XML signature does not cover the Metadata document", where)
    check_validity(signer_cert, f"{where}: metadata signer", at, allow_expired)
    check_chain(signer_cert, f"{where}: metadata signer", chain, trust, allow_untrusted_root,
                at=at, allow_expired=allow_expired)
    gi = _child(signed, "GuardianInformation", where)
    ver = _child(gi, "Version", where).text
    if (ver or "").strip() != METADATA_VERSION or signed.get("Version") != METADATA_VERSION:
        raise FormatError(f"unsupported guardian metadata version {ver!r}", where)
    enc = _cert(_child(gi, "EncryptionCertificate", where), "EncryptionCertificate", where)
    sig = _cert(_child(gi, "SigningCertificate", where), "SigningCertificate", where)
    _check_sig(_child(gi, "SigningCertificateSelfSignature", where), sig, _der(sig),
               "SigningCertificateSelfSignature", where)
    ecs_el = _child(gi, "EncryptionCertificateSignature", where)
    _check_sig(ecs_el, sig, _der(enc), "EncryptionCertificateSignature", where)
    ecs = (ecs_el.get("Algorithm") or "", _unb64(_child(ecs_el, "SignatureValue", where).text, "signature", where))
    others_el = _child(gi, "OtherSigningCertificates", where, required=False)
    others = [] if others_el is None else [_cert(c, "OtherSigningCertificates", where)
                                           for c in others_el.findall(_K + "Certificate")]
    check_usage(sig, "signing", where)
    check_usage(enc, "encryption", where)
    for c in (sig, enc):
        check_validity(c, where, at, allow_expired)
    check_chain(sig, where, others, trust, allow_untrusted_root, at=at, allow_expired=allow_expired)
    return Guardian(name, sig, enc, other_signing_certificates=others, source="imported", encryption_signature=ecs)
