"""Raw signatures over bytes with XML-DSig algorithm URIs (RFC 6931), shared by guardian metadata and KPs.

[MS-KPS] ``Signature_T`` values (certificate signatures, GuardianSignature) carry an algorithm
URI and a base64 signature value. We use the XML-DSig "more" URIs:

* ``http://www.w3.org/2001/04/xmldsig-more#rsa-sha256`` — RSASSA-PKCS1-v1_5 with SHA-256;
* ``http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256`` / ``#ecdsa-sha384`` — ECDSA, the value
  being ``r || s`` as fixed-length big-endian integers (RFC 4051 §3.3).

All primitives come from ``cryptography``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import IntegrityError, UnsupportedError

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
ECDSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
ECDSA_SHA384 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384"
SIGNATURE_ALGORITHMS = (RSA_SHA256, ECDSA_SHA256, ECDSA_SHA384)


def algorithm_for(key: SigningKey | VerifyingKey) -> str:
    """The signature algorithm URI we use for a private or public key."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return RSA_SHA256
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return ECDSA_SHA384 if key.curve.key_size >= 384 else ECDSA_SHA256
    raise UnsupportedError(f"unsupported signing key type {type(key).__name__}", hint="use RSA or EC P-256/P-384")


def _coord_len(curve: ec.EllipticCurve) -> int:
    return (curve.key_size + 7) // 8


def sign_bytes(key: SigningKey, data: bytes) -> tuple[str, bytes]:
    """Sign ``data``; returns (algorithm URI, signature value)."""
    alg = algorithm_for(key)
    if isinstance(key, rsa.RSAPrivateKey):
        return alg, key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    h = hashes.SHA384() if alg == ECDSA_SHA384 else hashes.SHA256()
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(h)))
    n = _coord_len(key.curve)
    return alg, r.to_bytes(n, "big") + s.to_bytes(n, "big")


def verify_bytes(public_key: object, algorithm: str, signature: bytes, data: bytes, what: str, where: str) -> None:
    """Verify a signature made by :func:`sign_bytes`; IntegrityError when it does not verify."""
    if algorithm not in SIGNATURE_ALGORITHMS:
        raise UnsupportedError(
            f"signature algorithm {algorithm!r} is not supported", where, "expected rsa-sha256 or ecdsa-sha256/384"
        )
    try:
        if algorithm == RSA_SHA256:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise InvalidSignature
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or algorithm != algorithm_for(public_key):
                raise InvalidSignature
            n = _coord_len(public_key.curve)
            if len(signature) != 2 * n:
                raise InvalidSignature
            der = encode_dss_signature(int.from_bytes(signature[:n], "big"), int.from_bytes(signature[n:], "big"))
            h = hashes.SHA384() if algorithm == ECDSA_SHA384 else hashes.SHA256()
            public_key.verify(der, data, ec.ECDSA(h))
    except InvalidSignature:
        raise IntegrityError(
            f"{what} does not verify", where, "the file was altered or signed by another key"
        ) from None
