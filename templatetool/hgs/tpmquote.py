"""TPM quote attestation primitives: MakeCredential (certify an AK against an EK) and quote checks.

Server side of the [MS-HGSA]-style TPM mode, in software (TPM 2.0 Part 1 §24 "Credential
Protection", Part 3 TPM2_MakeCredential/TPM2_Quote):

* ``make_credential(ek_public, ak_name, credential)`` → (TPM2B_ID_OBJECT contents, encrypted
  secret): seed = RSA-OAEP(label "IDENTITY\\0") or ECDH + KDFe("IDENTITY"); symKey =
  KDFa(seed, "STORAGE", AK Name); encIdentity = AES-CFB(symKey, TPM2B(credential));
  integrityHMAC = HMAC(KDFa(seed, "INTEGRITY"), encIdentity || AK Name). Only a TPM holding the
  EK private key *and* the AK with that Name gets the credential back (TPM2_ActivateCredential).
* ``parse_ak_public`` checks the AK is a restricted signing key fixed to its TPM.
* ``verify_quote`` checks the TPMS_ATTEST (TPM_GENERATED magic, quote type, qualifying data =
  the server's challenge), its signature by the AK, and that the quoted PCR digest equals the
  digest of the PCR values the server replayed from the TCG log.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from construct import ConstructError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import FormatError, IntegrityError, PolicyError, UnsupportedError
from ..tpm import structs as s
from ..tpm.algs import digest_size, hash_alg, hash_bytes, pcrs_from_bitmap
from ..tpm.duplicate import _aes_cfb, kdfa, kdfe
from ..tpm.keys import _CURVES, ParentKey, object_name, parse_parent_public
from . import quote_structs as q

IDENTITY_LABEL = b"IDENTITY\x00"
#: Attributes an AK must have: fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign.
AK_REQUIRED = s.ATTR_FIXED_TPM | s.ATTR_FIXED_PARENT | s.ATTR_SENSITIVE_DATA_ORIGIN | s.ATTR_RESTRICTED | s.ATTR_SIGN


def _seed(ek: ParentKey) -> tuple[bytes, bytes]:
    n = digest_size(ek.name_alg)
    if isinstance(ek.public_key, rsa.RSAPublicKey):
        seed = os.urandom(n)
        h = hash_alg(ek.name_alg)
        return seed, ek.public_key.encrypt(seed, padding.OAEP(padding.MGF1(h), h, IDENTITY_LABEL))
    curve = ek.public_key.curve
    size = (curve.key_size + 7) // 8
    eph = ec.generate_private_key(curve)
    z = eph.exchange(ec.ECDH(), ek.public_key)
    en = eph.public_key().public_numbers()
    ex, ey = en.x.to_bytes(size, "big"), en.y.to_bytes(size, "big")
    px = ek.public_key.public_numbers().x.to_bytes(size, "big")
    return kdfe(ek.name_alg, z, IDENTITY_LABEL, ex, px, 8 * n), s.TPMS_ECC_POINT.build({"x": ex, "y": ey})


def parse_ek_public(public_area: bytes, where: str = "EK public") -> ParentKey:
    """A marshalled TPMT_PUBLIC of an EK (restricted decryption key), validated."""
    return parse_parent_public(public_area, where)


def make_credential(ek: ParentKey, ak_name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (credentialBlob = TPM2B_ID_OBJECT contents, secret)."""
    if not 1 <= len(credential) <= digest_size(ek.name_alg):
        raise ValueError("credential must be 1..digest-size bytes")
    seed, secret = _seed(ek)
    sym = kdfa(ek.name_alg, seed, b"STORAGE", ak_name, b"", ek.sym_bits)
    enc = _aes_cfb(sym, len(credential).to_bytes(2, "big") + credential, False)
    hk = kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", 8 * digest_size(ek.name_alg))
    mac = hmac.new(hk, enc + ak_name, hash_alg(ek.name_alg).name).digest()
    return q.ID_OBJECT.build({"integrityHMAC": mac, "encIdentity": enc}), secret


def parse_ak_public(public_area: bytes, where: str = "AK public") -> tuple[Any, bytes]:
    """(public key, Name) of an attestation key; refuses anything but a restricted signing key fixed to its TPM."""
    try:
        p = s.TPMT_PUBLIC.parse(public_area)
        if len(s.TPMT_PUBLIC.build(p)) != len(public_area):
            raise FormatError("trailing bytes after the AK's TPMT_PUBLIC", where)
    except (ConstructError, ValueError):
        raise FormatError("the AK public area is not a TPMT_PUBLIC", where) from None
    attrs = p.objectAttributes
    if attrs & AK_REQUIRED != AK_REQUIRED or attrs & s.ATTR_DECRYPT:
        raise PolicyError(f"the AK is not a restricted signing key fixed to its TPM (attributes 0x{attrs:08x})", where)
    try:
        if p.type == s.ALG_RSA:
            key: Any = rsa.RSAPublicNumbers(
                p.parameters.exponent or 65537, int.from_bytes(bytes(p.unique), "big")
            ).public_key()
        elif p.type == s.ALG_ECC and p.parameters.curveID in _CURVES:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(bytes(p.unique.x), "big"),
                int.from_bytes(bytes(p.unique.y), "big"),
                _CURVES[p.parameters.curveID][1](),
            ).public_key()
        else:
            raise UnsupportedError("the AK is not an RSA or NIST P-256/P-384 key", where)
    except ValueError:
        raise FormatError("the AK public key is invalid", where) from None
    return key, object_name(public_area)


def pcr_digest(hash_id: int, selection: dict[int, list[int]], values: dict[int, dict[int, bytes]]) -> bytes:
    """H(PCR values in selection order: banks as listed, PCRs ascending), as TPM2_Quote computes it."""
    parts = []
    for bank, pcrs in selection.items():
        for i in sorted(pcrs):
            parts.append(values[bank][i])
    return hash_bytes(hash_id, *parts)


def verify_quote(
    ak_key: Any,
    attest: bytes,
    signature: bytes,
    qualifying: bytes,
    values: dict[int, dict[int, bytes]],
    where: str = "TPM quote",
) -> dict[int, list[int]]:
    """Check a TPM2_Quote; returns its PCR selection {bank alg: [pcrs]}.

    ``values`` are the PCR values the verifier expects (replayed from the TCG log) per bank.
    IntegrityError when the signature, the qualifying data or the PCR digest does not match.
    """
    try:
        a = q.TPMS_ATTEST_QUOTE.parse(attest)
        sig = q.TPMT_SIGNATURE.parse(signature)
    except (ConstructError, ValueError):
        raise FormatError("the quote is not a TPMS_ATTEST / TPMT_SIGNATURE", where) from None
    if a.magic != q.TPM_GENERATED or a.type != q.ST_ATTEST_QUOTE:
        raise IntegrityError("the attestation structure is not a TPM-generated quote", where)
    try:
        if sig.sigAlg == q.ALG_RSASSA and isinstance(ak_key, rsa.RSAPublicKey):
            ak_key.verify(bytes(sig.signature.sig), attest, padding.PKCS1v15(), hash_alg(sig.signature.hash))
        elif sig.sigAlg == q.ALG_RSAPSS and isinstance(ak_key, rsa.RSAPublicKey):
            ak_key.verify(
                bytes(sig.signature.sig),
                attest,
                padding.PSS(padding.MGF1(hash_alg(sig.signature.hash)), padding.PSS.AUTO),
                hash_alg(sig.signature.hash),
            )
        elif sig.sigAlg == q.ALG_ECDSA and isinstance(ak_key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(
                int.from_bytes(bytes(sig.signature.r), "big"), int.from_bytes(bytes(sig.signature.s), "big")
            )
            ak_key.verify(der, attest, ec.ECDSA(hash_alg(sig.signature.hash)))
        else:
            raise UnsupportedError(f"quote signature scheme 0x{sig.sigAlg:04x} does not fit the AK", where)
    except InvalidSignature:
        raise IntegrityError("the quote signature does not verify with the AK", where) from None
    if not hmac.compare_digest(bytes(a.extraData), qualifying):
        raise IntegrityError(
            "the quote does not carry this server's challenge (qualifying data)",
            where,
            "quote with the nonce from this attestation round",
        )
    selection = {int(sel.hash): pcrs_from_bitmap(bytes(sel.pcrSelect)) for sel in a.attested.pcrSelect}
    for bank, pcrs in selection.items():
        if bank not in values or any(i not in values[bank] for i in pcrs):
            raise PolicyError(f"the quote covers PCRs the TCG log does not give (bank 0x{bank:04x})", where)
    want = pcr_digest(sig.signature.hash, selection, values)
    if not hmac.compare_digest(want, bytes(a.attested.pcrDigest)):
        raise IntegrityError(
            "the quoted PCRs differ from the PCRs the TCG log replays to", where, "the log does not describe this boot"
        )
    return selection


__all__ = ["AK_REQUIRED", "make_credential", "parse_ak_public", "parse_ek_public", "pcr_digest", "verify_quote"]
