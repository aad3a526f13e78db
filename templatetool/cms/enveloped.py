"""CMS AuthEnvelopedData (RFC 5083) with AES-256-GCM (RFC 5084) to several recipients.

Recipients:

* RSA certificates: KeyTransRecipientInfo (v0, issuerAndSerialNumber) with RSAES-OAEP,
  SHA-256 and MGF1-SHA-256 (RFC 4055).
* EC certificates (P-256, P-384, P-521): KeyAgreeRecipientInfo (v3, RFC 5753) with an
  ephemeral-static ECDH key, ``dhSinglePass-stdDH-sha256kdf-scheme`` (ANSI X9.63 KDF over
  ``ECC-CMS-SharedInfo``) and AES-256 key wrap (RFC 3394).

Why this module exists: ``cryptography`` (50) can only write EnvelopedData with RSA PKCS#1 v1.5 and
AES-CBC, and cannot address EC recipients. So the structures are declared here with asn1crypto and
every primitive (OAEP, ECDH, X9.63 KDF, key wrap, GCM) comes from ``cryptography``; nothing
cryptographic is hand-written. The output is checked against ``openssl cms -decrypt`` in the tests.

Reading accepts what this module writes plus what ``openssl cms -encrypt -aes-256-gcm`` writes
(OAEP with any SHA-2 hash, ECDH with SHA-1/SHA-2 X9.63 KDFs, AES-128/192/256 key wrap).
"""

# ruff: noqa: RUF012  (asn1crypto declares ASN.1 structures as class attributes)
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from asn1crypto import algos, cms, core, keys
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    TemplateToolError,
    UnsupportedError,
    UsageError,
)

#: A recipient private key (``cryptography`` object; HSM-backed keys must implement decrypt/exchange).
RecipientKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

__all__ = [
    "OID_AUTH_ENVELOPED_DATA",
    "RecipientDescription",
    "RecipientKey",
    "envelope",
    "list_recipients",
    "open_envelope",
    "recipient_ids",
]

OID_AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"
OID_DATA = "1.2.840.113549.1.7.1"
OID_AES256_GCM = "2.16.840.1.101.3.4.1.46"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"

#: ECDH single-pass KDF schemes (RFC 5753 / SEC 1) → hash used by the X9.63 KDF.
_ECDH_SCHEMES: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.133.16.840.63.0.2": hashes.SHA1,  # dhSinglePass-stdDH-sha1kdf-scheme (read only)
    "1.3.132.1.11.0": hashes.SHA224,
    "1.3.132.1.11.1": hashes.SHA256,  # what we write
    "1.3.132.1.11.2": hashes.SHA384,
    "1.3.132.1.11.3": hashes.SHA512,
}
OID_ECDH_SHA256KDF = "1.3.132.1.11.1"
#: AES key wrap algorithm OIDs (RFC 3565) → key-encryption-key length in bytes.
_WRAP_ALGS = {"2.16.840.1.101.3.4.1.5": 16, "2.16.840.1.101.3.4.1.25": 24, "2.16.840.1.101.3.4.1.45": 32}
OID_AES256_WRAP = "2.16.840.1.101.3.4.1.45"

_OAEP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

GCM_NONCE_LEN = 12
GCM_TAG_LEN = 16


# --------------------------------------------------------------------------------------------
# ASN.1 structures asn1crypto 1.5 lacks (or maps too strictly for reading foreign algorithms)
# --------------------------------------------------------------------------------------------


class _AlgId(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    """AlgorithmIdentifier with uninterpreted parameters."""

    _fields = [("algorithm", core.ObjectIdentifier), ("parameters", core.Any, {"optional": True})]


class _GCMParameters(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    """RFC 5084 GCMParameters."""

    _fields = [("aes_nonce", core.OctetString), ("aes_icv_len", core.Integer, {"default": 12})]


class _EccCmsSharedInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    """RFC 5753 ECC-CMS-SharedInfo (the X9.63 KDF's SharedInfo)."""

    _fields = [
        ("key_info", _AlgId),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


class _KeyAgreeRecipientInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    """RFC 5652 KeyAgreeRecipientInfo with a generic key-encryption AlgorithmIdentifier."""

    _fields = [
        ("version", cms.CMSVersion),
        ("originator", cms.OriginatorIdentifierOrKey, {"explicit": 0}),
        ("ukm", core.OctetString, {"explicit": 1, "optional": True}),
        ("key_encryption_algorithm", _AlgId),
        ("recipient_encrypted_keys", cms.RecipientEncryptedKeys),
    ]


class _RecipientInfo(core.Choice):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    _alternatives = [
        ("ktri", cms.KeyTransRecipientInfo),
        ("kari", _KeyAgreeRecipientInfo, {"implicit": 1}),
        ("kekri", cms.KEKRecipientInfo, {"implicit": 2}),
        ("pwri", cms.PasswordRecipientInfo, {"implicit": 3}),
        ("ori", cms.OtherRecipientInfo, {"implicit": 4}),
    ]


class _RecipientInfos(core.SetOf):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    _child_spec = _RecipientInfo


class _EncryptedContentInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    _fields = [
        ("content_type", core.ObjectIdentifier),
        ("content_encryption_algorithm", _AlgId),
        ("encrypted_content", core.OctetString, {"implicit": 0, "optional": True}),
    ]


class _AuthEnvelopedData(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    """RFC 5083 AuthEnvelopedData."""

    _fields = [
        ("version", core.Integer),
        ("originator_info", cms.OriginatorInfo, {"implicit": 0, "optional": True}),
        ("recipient_infos", _RecipientInfos),
        ("auth_encrypted_content_info", _EncryptedContentInfo),
        ("auth_attrs", cms.CMSAttributes, {"implicit": 1, "optional": True}),
        ("mac", core.OctetString),
        ("unauth_attrs", cms.CMSAttributes, {"implicit": 2, "optional": True}),
    ]


class _ContentInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    _fields = [("content_type", core.ObjectIdentifier), ("content", core.Any, {"explicit": 0})]


class _AuthEnvelopedContentInfo(core.Sequence):  # type: ignore[misc]  # asn1crypto is untyped: its base classes are Any
    _fields = [("content_type", core.ObjectIdentifier), ("content", _AuthEnvelopedData, {"explicit": 0})]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _issuer_serial(cert: x509.Certificate) -> cms.IssuerAndSerialNumber:
    a = _asn1_cert(cert)
    return cms.IssuerAndSerialNumber({"issuer": a.issuer, "serial_number": a.serial_number})


def _asn1_cert(cert: x509.Certificate) -> Any:  # an asn1crypto.x509.Certificate (asn1crypto is untyped)
    from asn1crypto import x509 as ax509

    return ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _shared_info(wrap_oid: str, kek_len: int, ukm: bytes | None) -> bytes:
    info = {"key_info": _AlgId({"algorithm": wrap_oid}), "supp_pub_info": (kek_len * 8).to_bytes(4, "big")}
    if ukm is not None:
        info["entity_u_info"] = ukm
    der: bytes = _EccCmsSharedInfo(info).dump()
    return der


def _kek(shared: bytes, hash_cls: type[hashes.HashAlgorithm], wrap_oid: str, kek_len: int, ukm: bytes | None) -> bytes:
    return X963KDF(algorithm=hash_cls(), length=kek_len, sharedinfo=_shared_info(wrap_oid, kek_len, ukm)).derive(shared)


def _check_encryption_usage(cert: x509.Certificate, need: str) -> None:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # no KeyUsage extension: every usage is allowed (RFC 5280 §4.2.1.3)
    ok = ku.key_agreement if need == "keyAgreement" else ku.key_encipherment
    if not ok:
        raise UsageError(
            f"certificate is not allowed for encryption (KeyUsage lacks {need})",
            cert.subject.rfc4514_string(),
            "use the guardian's encryption certificate, not its signing certificate",
        )


def _ktri(cert: x509.Certificate, cek: bytes) -> _RecipientInfo:
    pub = cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    _check_encryption_usage(cert, "keyEncipherment")
    enc = pub.encrypt(cek, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    alg = cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
                }
            ),
        }
    )
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": "v0",
            "rid": cms.RecipientIdentifier({"issuer_and_serial_number": _issuer_serial(cert)}),
            "key_encryption_algorithm": alg,
            "encrypted_key": enc,
        }
    )
    return _RecipientInfo(name="ktri", value=ktri)


def _kari(cert: x509.Certificate, cek: bytes) -> _RecipientInfo:
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    _check_encryption_usage(cert, "keyAgreement")
    eph = ec.generate_private_key(pub.curve)
    shared = eph.exchange(ec.ECDH(), pub)
    kek = _kek(shared, hashes.SHA256, OID_AES256_WRAP, 32, None)
    wrapped = aes_key_wrap(kek, cek)
    eph_point = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    # OriginatorPublicKey: id-ecPublicKey with parameters absent (RFC 5753 §7.1.3 allows absent or
    # NULL; openssl emits absent), publicKey = the uncompressed point.
    orig_key = keys.PublicKeyInfo(
        {
            "algorithm": keys.PublicKeyAlgorithm({"algorithm": "ec"}),
            "public_key": eph_point,
        }
    )
    kari = _KeyAgreeRecipientInfo(
        {
            "version": "v3",
            "originator": cms.OriginatorIdentifierOrKey(name="originator_key", value=orig_key),
            "key_encryption_algorithm": _AlgId(
                {
                    "algorithm": OID_ECDH_SHA256KDF,
                    "parameters": _AlgId({"algorithm": OID_AES256_WRAP}),
                }
            ),
            "recipient_encrypted_keys": [
                {
                    "rid": cms.KeyAgreementRecipientIdentifier(
                        name="issuer_and_serial_number", value=_issuer_serial(cert)
                    ),
                    "encrypted_key": wrapped,
                },
            ],
        }
    )
    return _RecipientInfo(name="kari", value=kari)


def envelope(content: bytes, recipients: list[x509.Certificate]) -> bytes:
    """Encrypt ``content`` with AES-256-GCM to every certificate in ``recipients``.

    Returns a DER ``ContentInfo`` holding ``AuthEnvelopedData`` (eContentType id-data, no
    authenticated attributes). RSA recipients get RSAES-OAEP-SHA256, EC recipients ECDH with
    the SHA-256 X9.63 KDF and AES-256 key wrap. Raises UsageError for an empty recipient list, an
    unsupported key type, or a certificate whose KeyUsage forbids the needed operation.
    """
    if not recipients:
        raise UsageError("an envelope needs at least one recipient")
    cek = AESGCM.generate_key(256)
    infos = []
    for cert in recipients:
        pub = cert.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            infos.append(_ktri(cert, cek))
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            infos.append(_kari(cert, cek))
        else:
            raise UsageError(
                f"unsupported recipient key type {type(pub).__name__}",
                cert.subject.rfc4514_string(),
                "use an RSA or EC (P-256/P-384) encryption certificate",
            )
    nonce = os.urandom(GCM_NONCE_LEN)
    sealed = AESGCM(cek).encrypt(nonce, content, None)
    ciphertext, tag = sealed[:-GCM_TAG_LEN], sealed[-GCM_TAG_LEN:]
    aed = _AuthEnvelopedData(
        {
            "version": 0,
            "recipient_infos": infos,
            "auth_encrypted_content_info": {
                "content_type": OID_DATA,
                "content_encryption_algorithm": _AlgId(
                    {
                        "algorithm": OID_AES256_GCM,
                        "parameters": _GCMParameters({"aes_nonce": nonce, "aes_icv_len": GCM_TAG_LEN}),
                    }
                ),
                "encrypted_content": ciphertext,
            },
            "mac": tag,
        }
    )
    der: bytes = _AuthEnvelopedContentInfo({"content_type": OID_AUTH_ENVELOPED_DATA, "content": aed}).dump()
    return der


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class RecipientDescription:
    """One recipient as recorded in the envelope (for display)."""

    kind: str  # "ktri" (RSA key transport) or "kari" (ECDH key agreement)
    issuer: str
    serial: int
    algorithm: str

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "issuer": self.issuer,
            "serial": format(self.serial, "x"),
            "algorithm": self.algorithm,
        }


def _parse(der: bytes, where: str) -> _AuthEnvelopedData:
    try:
        ci = _ContentInfo.load(der, strict=True)
        if ci["content_type"].dotted != OID_AUTH_ENVELOPED_DATA:
            raise FormatError(
                f"CMS content type {ci['content_type'].dotted} is not AuthEnvelopedData",
                where,
                "expected an envelope written by templatetool or openssl cms -encrypt -aes-256-gcm",
            )
        aed: _AuthEnvelopedData = _AuthEnvelopedContentInfo.load(der, strict=True)["content"]
        _ = aed.native  # force a full parse so malformed inner fields fail here
        for ri in aed["recipient_infos"]:
            _ = ri.chosen.native
        return aed
    except FormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise FormatError(f"malformed CMS envelope: {e}", where, "the file is damaged or not a CMS envelope") from None


def _rid_matches(rid: Any, cert: x509.Certificate) -> bool:  # rid: an asn1crypto Choice
    """True when a RecipientIdentifier / KeyAgreementRecipientIdentifier names ``cert``."""
    ac = _asn1_cert(cert)
    if rid.name == "issuer_and_serial_number":
        ias = rid.chosen
        return bool(ias["issuer"].dump() == ac.issuer.dump() and ias["serial_number"].native == ac.serial_number)
    ski = ac.key_identifier
    if rid.name == "subject_key_identifier":
        return ski is not None and rid.chosen.native == ski
    if rid.name == "r_key_id":
        return ski is not None and rid.chosen["subject_key_identifier"].native == ski
    return False


def list_recipients(der: bytes, where: str = "envelope") -> list[RecipientDescription]:
    """Describe the recipients recorded in an AuthEnvelopedData (no key needed)."""
    aed = _parse(der, where)
    out = []
    for ri in aed["recipient_infos"]:
        if ri.name == "ktri":
            rids = [ri.chosen["rid"]]
            alg = ri.chosen["key_encryption_algorithm"]["algorithm"].native
        elif ri.name == "kari":
            rids = [rek["rid"] for rek in ri.chosen["recipient_encrypted_keys"]]
            alg = ri.chosen["key_encryption_algorithm"]["algorithm"].dotted
        else:
            out.append(RecipientDescription(ri.name, "", 0, "unsupported"))
            continue
        for rid in rids:
            if rid.name == "issuer_and_serial_number":
                out.append(
                    RecipientDescription(
                        ri.name, rid.chosen["issuer"].human_friendly, rid.chosen["serial_number"].native, alg
                    )
                )
            else:
                out.append(RecipientDescription(ri.name, "(key identifier)", 0, alg))
    return out


def recipient_ids(der: bytes, where: str = "envelope") -> list[tuple[bytes, int]]:
    """(issuer Name DER, serial) of every recipient named by issuerAndSerialNumber.

    FormatError when a recipient is identified another way (key identifier) or is not ktri/kari.
    """
    aed = _parse(der, where)
    out = []
    for ri in aed["recipient_infos"]:
        if ri.name == "ktri":
            rids = [ri.chosen["rid"]]
        elif ri.name == "kari":
            rids = [rek["rid"] for rek in ri.chosen["recipient_encrypted_keys"]]
        else:
            raise FormatError(f"unsupported recipient kind {ri.name}", where)
        for rid in rids:
            if rid.name != "issuer_and_serial_number":
                raise FormatError("recipient identified by key identifier", where)
            out.append((rid.chosen["issuer"].dump(), rid.chosen["serial_number"].native))
    return out


def _key_matches_cert(key: RecipientKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _open_ktri(ktri: Any, key: rsa.RSAPrivateKey, where: str) -> bytes:  # ktri: asn1crypto KeyTransRecipientInfo
    alg = ktri["key_encryption_algorithm"]
    if alg["algorithm"].native != "rsaes_oaep":
        raise UnsupportedError(
            f"RSA key transport {alg['algorithm'].native} is not supported",
            where,
            "only RSAES-OAEP recipients are read",
        )
    params = alg["parameters"]
    h = params["hash_algorithm"]["algorithm"].native
    mgf_h = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
    if h not in _OAEP_HASHES or mgf_h not in _OAEP_HASHES:
        raise UnsupportedError(f"OAEP hash {h}/{mgf_h} is not supported", where)
    label = params["p_source_algorithm"]["parameters"].native or None
    try:
        return key.decrypt(
            ktri["encrypted_key"].native,
            padding.OAEP(mgf=padding.MGF1(_OAEP_HASHES[mgf_h]()), algorithm=_OAEP_HASHES[h](), label=label),
        )
    except ValueError:
        raise IntegrityError("the wrapped content key does not decrypt", where, "the envelope was altered") from None


def _open_kari(kari: _KeyAgreeRecipientInfo, rek_der: bytes, key: ec.EllipticCurvePrivateKey, where: str) -> bytes:
    alg = kari["key_encryption_algorithm"]
    scheme = alg["algorithm"].dotted
    if scheme not in _ECDH_SCHEMES:
        raise UnsupportedError(
            f"key agreement scheme {scheme} is not supported",
            where,
            "only dhSinglePass-stdDH-sha*kdf-scheme recipients are read",
        )
    try:
        wrap = _AlgId.load(alg["parameters"].dump())
    except (ValueError, TypeError):
        raise FormatError("malformed key-wrap algorithm in a key agreement recipient", where) from None
    wrap_oid = wrap["algorithm"].dotted
    if wrap_oid not in _WRAP_ALGS:
        raise UnsupportedError(f"key wrap {wrap_oid} is not supported", where, "only AES key wrap is read")
    orig = kari["originator"]
    if orig.name != "originator_key":
        raise UnsupportedError("static originator keys are not supported", where)
    point = orig.chosen["public_key"].native
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
    except ValueError:
        raise IntegrityError(
            "the originator's ephemeral key is not a point on the recipient's curve", where, "the envelope was altered"
        ) from None
    ukm = kari["ukm"].native if kari["ukm"].native is not None else None
    kek_len = _WRAP_ALGS[wrap_oid]
    shared = key.exchange(ec.ECDH(), eph)
    kek = _kek(shared, _ECDH_SCHEMES[scheme], wrap_oid, kek_len, ukm)
    try:
        return aes_key_unwrap(kek, rek_der)
    except InvalidUnwrap:
        raise IntegrityError("the wrapped content key does not unwrap", where, "the envelope was altered") from None


def open_envelope(der: bytes, key: RecipientKey, cert: x509.Certificate, where: str = "envelope") -> bytes:
    """Decrypt an AuthEnvelopedData with a recipient's private ``key`` and certificate ``cert``.

    Raises CredentialError when ``cert`` is not one of the recipients or ``key`` does not belong to
    it, IntegrityError when the envelope was altered (GCM tag, key unwrap), FormatError when it is
    malformed and UnsupportedError for algorithms this module does not read.
    """
    try:
        return _open_envelope(der, key, cert, where)
    except TemplateToolError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        # asn1crypto parses nested fields lazily: damage deep inside surfaces here
        raise FormatError(f"malformed CMS envelope ({type(e).__name__}: {e})", where) from None


def _open_envelope(der: bytes, key: RecipientKey, cert: x509.Certificate, where: str) -> bytes:
    aed = _parse(der, where)
    if not _key_matches_cert(key, cert):
        raise CredentialError(
            "the private key does not belong to the given certificate",
            where,
            "pass the key and certificate of the same recipient",
        )
    cek: bytes | None = None
    for ri in aed["recipient_infos"]:
        if ri.name == "ktri" and _rid_matches(ri.chosen["rid"], cert):
            if not isinstance(key, rsa.RSAPrivateKey):
                raise CredentialError("an RSA recipient needs an RSA private key", where)
            cek = _open_ktri(ri.chosen, key, where)
            break
        if ri.name == "kari":
            for rek in ri.chosen["recipient_encrypted_keys"]:
                if _rid_matches(rek["rid"], cert):
                    if not isinstance(key, ec.EllipticCurvePrivateKey):
                        raise CredentialError("an EC recipient needs an EC private key", where)
                    cek = _open_kari(ri.chosen, rek["encrypted_key"].native, key, where)
                    break
            if cek is not None:
                break
    if cek is None:
        raise CredentialError(
            "this certificate is not a recipient of the envelope",
            f"{where}: {cert.subject.rfc4514_string()}",
            "use the key of the owner or of one of the guardians it was made for",
        )
    eci = aed["auth_encrypted_content_info"]
    calg = eci["content_encryption_algorithm"]
    if calg["algorithm"].dotted not in ("2.16.840.1.101.3.4.1.6", "2.16.840.1.101.3.4.1.26", OID_AES256_GCM):
        raise UnsupportedError(
            f"content cipher {calg['algorithm'].dotted} is not supported", where, "only AES-GCM is read"
        )
    try:
        gp = _GCMParameters.load(calg["parameters"].dump())
        nonce = gp["aes_nonce"].native
        icv_len = gp["aes_icv_len"].native
    except (ValueError, TypeError, AttributeError):
        raise FormatError("malformed GCM parameters", where) from None
    tag = aed["mac"].native
    if len(tag) != icv_len or icv_len < 12 or not (8 <= len(nonce) <= 64):
        raise IntegrityError("the GCM tag or nonce has the wrong length", where, "the envelope was altered")
    if len(cek) * 8 not in (128, 192, 256) or len(cek) != {
        "2.16.840.1.101.3.4.1.6": 16,
        "2.16.840.1.101.3.4.1.26": 24,
    }.get(calg["algorithm"].dotted, 32):
        raise IntegrityError("the content key has the wrong length", where, "the envelope was altered")
    aad = None
    if aed["auth_attrs"].native is not None:
        # RFC 5083 §2.2: the AAD is the DER of authAttrs with an EXPLICIT SET OF tag.
        aad = aed["auth_attrs"].untag().dump()
    ciphertext = eci["encrypted_content"].native or b""
    try:
        if icv_len == GCM_TAG_LEN and len(nonce) == GCM_NONCE_LEN:
            return AESGCM(cek).decrypt(nonce, ciphertext + tag, aad)
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        dec = Cipher(algorithms.AES(cek), modes.GCM(nonce, tag, min_tag_length=icv_len)).decryptor()
        if aad:
            dec.authenticate_additional_data(aad)
        return dec.update(ciphertext) + dec.finalize()
    except InvalidTag:
        raise IntegrityError(
            "the envelope's authentication tag does not verify", where, "the encrypted content was altered or truncated"
        ) from None
