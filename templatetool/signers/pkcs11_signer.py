"""PKCS#11 signer addressed by an RFC 7512 URI; the private key never leaves the token.

``pkcs11:token=LABEL;object=KEYLABEL;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so``

* path attributes used: ``token``, ``serial``, ``object``, ``id``, ``type`` (must be private
  if given); query attributes: ``module-path`` (else ``$TEMPLATETOOL_PKCS11_MODULE``) and our
  vendor attribute ``x-cert-path`` (certificate file when the token holds none).
* the PIN comes only from an environment variable (default ``TEMPLATETOOL_PKCS11_PIN``),
  never from the URI (``pin-value`` is refused) or argv.

The private-key object returned by :meth:`Pkcs11Signer.private_key` subclasses cryptography's
``RSAPrivateKey``/``EllipticCurvePrivateKey``: ``sign()`` hashes locally and asks the token to
sign the digest (CKM_RSA_PKCS over a DigestInfo, CKM_RSA_PKCS_PSS, or CKM_ECDSA).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ..errors import CredentialError, NotFoundError, ResourceError, UnsupportedError, UsageError
from ..secrets import read_secret
from .base import Signer
from .certs import load_certificates

DEFAULT_PIN_ENV = "TEMPLATETOOL_PKCS11_PIN"
MODULE_ENV = "TEMPLATETOOL_PKCS11_MODULE"

# DER DigestInfo prefixes (RFC 8017 §9.2 note 1) for CKM_RSA_PKCS over a precomputed digest.
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


@dataclass
class Pkcs11Uri:
    """The parts of an RFC 7512 URI we use."""

    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    #: The ``id`` attribute as raw bytes (percent-decoded), b"" when absent.
    _raw_id: bytes = b""


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse ``pkcs11:path-attrs?query-attrs`` (percent-decoding values; ``id`` kept as bytes)."""
    if not uri.startswith("pkcs11:"):
        raise UsageError("not a PKCS#11 URI", hint="use pkcs11:token=...;object=...")
    body = uri[len("pkcs11:"):]
    path_part, _, query_part = body.partition("?")
    out = Pkcs11Uri()
    for item in filter(None, path_part.split(";")):
        k, sep, v = item.partition("=")
        if not sep:
            raise UsageError(f"bad PKCS#11 URI attribute {k!r}", hint="attributes are name=value; separated by ';'")
        if k == "id":
            out._raw_id = urllib.parse.unquote_to_bytes(v)
        out.path[k] = urllib.parse.unquote(v)
    for item in filter(None, query_part.split("&")):
        k, sep, v = item.partition("=")
        if not sep:
            raise UsageError(f"bad PKCS#11 URI query attribute {k!r}")
        out.query[k] = urllib.parse.unquote(v)
    if "pin-value" in out.query or "pin-value" in out.path:
        raise UsageError("a PIN in the URI is refused (it would show in argv and logs)",
                         hint=f"put it in ${DEFAULT_PIN_ENV} or the variable named by --pin-env")
    return out


def _hash_obj(algorithm: Any) -> tuple[hashes.HashAlgorithm, bool]:
    if isinstance(algorithm, utils.Prehashed):
        return algorithm._algorithm, True  # noqa: SLF001 - public type, private attr only here
    return algorithm, False


def _digest(data: bytes, algorithm: Any) -> tuple[bytes, hashes.HashAlgorithm]:
    alg, pre = _hash_obj(algorithm)
    if pre:
        return data, alg
    h = hashes.Hash(alg)
    h.update(data)
    return h.finalize(), alg


def _token_error(e: Exception, what: str) -> Exception:
    import pkcs11.exceptions as px

    if isinstance(e, (px.PinIncorrect, px.PinInvalid, px.PinLenRange)):
        return CredentialError("the token refused the PIN", what, "check the PIN variable")
    if isinstance(e, (px.PinLocked, px.PinExpired)):
        return CredentialError(f"the token PIN is unusable: {type(e).__name__}", what)
    if isinstance(e, px.MechanismInvalid):
        return UnsupportedError(f"the token does not support this mechanism ({type(e).__name__})", what)
    return ResourceError(f"PKCS#11 error: {type(e).__name__} {e}".strip(), what)


class _TokenKeyMixin:
    _signer: "Pkcs11Signer"
    _pub: Any

    def public_key(self) -> Any:
        return self._pub

    @property
    def key_size(self) -> int:
        return self._pub.key_size

    def private_numbers(self) -> Any:
        raise UnsupportedError("the private key lives in the PKCS#11 token and cannot be exported")

    def private_bytes(self, *a: Any, **k: Any) -> bytes:
        raise UnsupportedError("the private key lives in the PKCS#11 token and cannot be exported")

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: Any) -> Any:
        return self


class TokenRSAPrivateKey(_TokenKeyMixin, rsa.RSAPrivateKey):
    """An RSA private key inside a PKCS#11 token (sign only)."""

    def __init__(self, signer: "Pkcs11Signer", pub: rsa.RSAPublicKey) -> None:
        self._signer = signer
        self._pub = pub

    def decrypt(self, ciphertext: bytes, padding: Any) -> bytes:  # noqa: A002
        raise UnsupportedError("decryption with a token signing key is not supported")

    def sign(self, data: bytes, padding_: Any, algorithm: Any) -> bytes:  # type: ignore[override]
        from pkcs11 import MGF, Mechanism

        digest, alg = _digest(data, algorithm)
        if isinstance(padding_, padding.PKCS1v15):
            if alg.name not in _DIGEST_INFO:
                raise UnsupportedError(f"hash {alg.name} not supported for token RSA signing")
            return self._signer._sign(_DIGEST_INFO[alg.name] + digest, Mechanism.RSA_PKCS, None)
        if isinstance(padding_, padding.PSS):
            hmech, mgf = {
                "sha256": (Mechanism.SHA256, MGF.SHA256),
                "sha384": (Mechanism.SHA384, MGF.SHA384),
                "sha512": (Mechanism.SHA512, MGF.SHA512),
            }[alg.name]
            salt = padding_._salt_length  # noqa: SLF001
            if salt is padding.PSS.DIGEST_LENGTH:
                salt = alg.digest_size
            elif salt is padding.PSS.MAX_LENGTH:
                salt = (self._pub.key_size + 7) // 8 - alg.digest_size - 2
            elif not isinstance(salt, int):
                raise UnsupportedError("PSS salt length must be DIGEST_LENGTH, MAX_LENGTH or a number")
            return self._signer._sign(digest, Mechanism.RSA_PKCS_PSS, (hmech, mgf, salt))
        raise UnsupportedError(f"RSA padding {type(padding_).__name__} not supported by the token signer")


class TokenECPrivateKey(_TokenKeyMixin, ec.EllipticCurvePrivateKey):
    """An EC (P-256/P-384) private key inside a PKCS#11 token (sign only)."""

    def __init__(self, signer: "Pkcs11Signer", pub: ec.EllipticCurvePublicKey) -> None:
        self._signer = signer
        self._pub = pub

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._pub.curve

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise UnsupportedError("ECDH with a token signing key is not supported")

    def sign(self, data: bytes, signature_algorithm: Any) -> bytes:  # type: ignore[override]
        from pkcs11 import Mechanism

        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedError("only ECDSA signing is supported")
        digest, _ = _digest(data, signature_algorithm.algorithm)
        raw = self._signer._sign(digest, Mechanism.ECDSA, None)
        n = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))


class Pkcs11Signer(Signer):
    """A signer whose private key stays inside a PKCS#11 token (SoftHSM2, smart card, HSM)."""

    def __init__(self, uri: str, pin_env: str | None = None) -> None:
        try:
            import pkcs11
        except ImportError as e:  # pragma: no cover - dependency is declared
            raise ResourceError(f"python-pkcs11 is not available: {e}") from None
        self.uri = parse_pkcs11_uri(uri)
        u = self.uri
        if u.path.get("type") not in (None, "private"):
            raise UsageError("the PKCS#11 URI must name a private key (type=private)", uri)
        module = u.query.get("module-path") or os.environ.get(MODULE_ENV)
        if not module:
            raise UsageError("no PKCS#11 module given",
                             hint=f"add ?module-path=/path/lib.so to the URI or set ${MODULE_ENV}")
        if not os.path.exists(module):
            raise NotFoundError("PKCS#11 module not found", module)
        self._where = self._safe_uri()
        try:
            lib = pkcs11.lib(module)
        except Exception as e:  # noqa: BLE001 - loader errors are untyped
            raise ResourceError(f"cannot load the PKCS#11 module: {e}", module) from None
        kw: dict[str, Any] = {}
        if "token" in u.path:
            kw["token_label"] = u.path["token"]
        if "serial" in u.path:
            kw["token_serial"] = u.path["serial"].encode()
        try:
            tokens = list(lib.get_tokens(**kw))
        except Exception as e:  # noqa: BLE001
            raise _token_error(e, self._where) from None
        if not tokens:
            raise NotFoundError("no PKCS#11 token matches the URI", self._where, "check token= / serial=")
        if len(tokens) > 1:
            raise UsageError("several PKCS#11 tokens match the URI", self._where, "add token= or serial=")
        pin = read_secret(pin_env or DEFAULT_PIN_ENV, "token PIN: ")
        try:
            self._session = tokens[0].open(user_pin=pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            self._session = tokens[0].open()  # another session of this process is logged in
        except Exception as e:  # noqa: BLE001
            raise _token_error(e, self._where) from None
        del pin
        try:
            self._select_key_and_cert()
        except BaseException:
            self.close()
            raise

    def _select_key_and_cert(self) -> None:
        from pkcs11 import Attribute, ObjectClass

        u = self.uri
        attrs: dict[Any, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if "object" in u.path:
            attrs[Attribute.LABEL] = u.path["object"]
        if "id" in u.path:
            attrs[Attribute.ID] = u._raw_id
        keys = list(self._session.get_objects(attrs))
        if not keys:
            raise NotFoundError("no private key on the token matches the URI", self._where, "check object= / id=")
        if len(keys) > 1:
            raise UsageError("several private keys match the URI", self._where, "add object= or id=")
        self._key = keys[0]
        self.certificate, self.chain = self._find_certificate()
        pub = self.certificate.public_key()
        if isinstance(pub, rsa.RSAPublicKey):
            self._pk: PrivateKeyTypes = TokenRSAPrivateKey(self, pub)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            self._pk = TokenECPrivateKey(self, pub)
        else:
            raise UnsupportedError(f"unsupported key type {type(pub).__name__}", self._where)

    def _safe_uri(self) -> str:
        parts = ";".join(f"{k}={v}" for k, v in self.uri.path.items() if k != "id")
        if "id" in self.uri.path:
            parts += f";id={self.uri._raw_id.hex()}"
        return f"pkcs11:{parts}"

    def _find_certificate(self) -> tuple[x509.Certificate, list[x509.Certificate]]:
        from pkcs11 import Attribute, ObjectClass

        path = self.uri.query.get("x-cert-path")
        if path:
            certs = load_certificates(path)
            return certs[0], certs[1:]
        found: list[x509.Certificate] = []
        for key_attr in ((Attribute.ID, self._key[Attribute.ID]), (Attribute.LABEL, self._key[Attribute.LABEL])):
            if not key_attr[1]:
                continue
            for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE, key_attr[0]: key_attr[1]}):
                try:
                    found.append(x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE])))
                except ValueError:
                    continue
            if found:
                break
        if not found:
            raise NotFoundError("the token holds no certificate for this key", self._where,
                                "store one with the same id/label or add ?x-cert-path=CERT.pem to the URI")
        return found[0], []

    def _sign(self, data: bytes, mechanism: Any, param: Any) -> bytes:
        try:
            return bytes(self._key.sign(data, mechanism=mechanism, mechanism_param=param))  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            raise _token_error(e, self._where) from None

    def private_key(self) -> PrivateKeyTypes:
        return self._pk

    def close(self) -> None:
        """Close the token session."""
        s = getattr(self, "_session", None)
        if s is not None:
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
            self._session = None  # type: ignore[assignment]

    def describe(self) -> str:
        return f"{self.certificate.subject.rfc4514_string()} ({self._where})"

    def __enter__(self) -> "Pkcs11Signer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


__all__ = ["Pkcs11Signer", "parse_pkcs11_uri", "TokenRSAPrivateKey", "TokenECPrivateKey"]
