"""PKCS#11 signer addressed by an RFC 7512 URI; the private key never leaves the token.

``pkcs11:token=LABEL;object=KEYLABEL;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so``

* path attributes used: ``token``, ``serial``, ``object``, ``id``, ``type`` (must be private
  if given); query attributes: ``module-path`` (else the caller's ``default_module``; the CLI
  passes ``$TEMPLATETOOL_PKCS11_MODULE``) and our
  vendor attribute ``x-cert-path`` (certificate file when the token holds none).
* the PIN is passed as a value (``bytes``/``str``) or a SecretSource, never taken from the URI
  (``pin-value`` is refused); the CLI reads it from ``$TEMPLATETOOL_PKCS11_PIN`` or ``--pin-env``.

:class:`Pkcs11Signer` implements the :class:`~templatetool.signers.base.Signer` protocol:
``sign_raw`` hashes locally and asks the token to sign the digest (CKM_RSA_PKCS over a DER
DigestInfo, CKM_RSA_PKCS_PSS with explicit hash/MGF/salt, or CKM_ECDSA, r||s re-encoded as DER).
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from ..errors import CredentialError, NotFoundError, ResourceError, UnsupportedError, UsageError
from .base import KeyAlgorithm, Secret, check_algorithm, key_algorithm_of, resolve_secret
from .certs import load_certificates

if TYPE_CHECKING:  # python-pkcs11 is an optional extra, imported only when a token is opened
    from pkcs11 import Session
    from pkcs11.types import Object

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
    body = uri[len("pkcs11:") :]
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
        raise UsageError("a PIN in the URI is refused (it would show in argv and logs)", hint="pass the PIN separately")
    return out


def _token_error(e: Exception, what: str) -> Exception:
    import pkcs11.exceptions as px

    if isinstance(e, (px.PinIncorrect, px.PinInvalid, px.PinLenRange)):
        return CredentialError("the token refused the PIN", what, "check the PIN")
    if isinstance(e, (px.PinLocked, px.PinExpired)):
        return CredentialError(f"the token PIN is unusable: {type(e).__name__}", what)
    if isinstance(e, px.MechanismInvalid):
        return UnsupportedError(f"the token does not support this mechanism ({type(e).__name__})", what)
    return ResourceError(f"PKCS#11 error: {type(e).__name__} {e}".strip(), what)


class Pkcs11Signer:
    """A :class:`~templatetool.signers.base.Signer` whose key stays inside a PKCS#11 token.

    ``pin`` is the user PIN as a value or a SecretSource (CredentialError when None).
    ``module`` overrides the URI's ``module-path``; ``default_module`` is used when neither names
    one (the CLI passes ``$TEMPLATETOOL_PKCS11_MODULE`` there: the library reads no environment).
    """

    _session: Session | None = None
    _key: Object

    def __init__(
        self, uri: str, pin: Secret | None = None, *, module: str | None = None, default_module: str | None = None
    ) -> None:
        try:
            import pkcs11
        except ImportError:  # an optional extra
            raise ResourceError(
                "PKCS#11 signing needs the python-pkcs11 module, an optional extra",
                uri.split("?")[0],
                "pip install 'templatetool[pkcs11]'",
            ) from None
        self.uri = parse_pkcs11_uri(uri)
        u = self.uri
        if u.path.get("type") not in (None, "private"):
            raise UsageError("the PKCS#11 URI must name a private key (type=private)", uri)
        module = module or u.query.get("module-path") or default_module
        if not module:
            raise UsageError(
                "no PKCS#11 module given",
                hint=f"add ?module-path=/path/lib.so to the URI (the CLI also reads ${MODULE_ENV})",
            )
        if not os.path.exists(module):
            raise NotFoundError("PKCS#11 module not found", module)
        self._where = self._safe_uri()
        try:
            lib = pkcs11.lib(module)
        except Exception as e:
            raise ResourceError(f"cannot load the PKCS#11 module: {e}", module) from None
        kw: dict[str, Any] = {}
        if "token" in u.path:
            kw["token_label"] = u.path["token"]
        if "serial" in u.path:
            kw["token_serial"] = u.path["serial"].encode()
        try:
            tokens = list(lib.get_tokens(**kw))
        except Exception as e:
            raise _token_error(e, self._where) from None
        if not tokens:
            raise NotFoundError("no PKCS#11 token matches the URI", self._where, "check token= / serial=")
        if len(tokens) > 1:
            raise UsageError("several PKCS#11 tokens match the URI", self._where, "add token= or serial=")
        if pin is None:
            raise CredentialError("the PKCS#11 token needs a PIN", self._where)
        try:
            pin_s = (resolve_secret(pin) or b"").decode("utf-8")  # python-pkcs11 takes str
        except UnicodeDecodeError:
            raise CredentialError("the PIN is not valid UTF-8", self._where) from None
        try:
            self._session = tokens[0].open(user_pin=pin_s)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            self._session = tokens[0].open()  # another session of this process is logged in
        except Exception as e:
            raise _token_error(e, self._where) from None
        del pin_s
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
        keys = list(self._live_session().get_objects(attrs))
        if not keys:
            raise NotFoundError("no private key on the token matches the URI", self._where, "check object= / id=")
        if len(keys) > 1:
            raise UsageError("several private keys match the URI", self._where, "add object= or id=")
        self._key = keys[0]
        self.certificate, self.chain = self._find_certificate()
        pub = self.certificate.public_key()
        if not isinstance(pub, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise UnsupportedError(f"unsupported key type {type(pub).__name__}", self._where)
        self.key_algorithm = key_algorithm_of(pub)

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
            for obj in self._live_session().get_objects(
                {Attribute.CLASS: ObjectClass.CERTIFICATE, key_attr[0]: key_attr[1]}
            ):
                try:
                    found.append(x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE])))
                except ValueError:
                    continue
            if found:
                break
        if not found:
            raise NotFoundError(
                "the token holds no certificate for this key",
                self._where,
                "store one with the same id/label or add ?x-cert-path=CERT.pem to the URI",
            )
        return found[0], []

    def _live_session(self) -> Session:
        if self._session is None:
            raise ResourceError("the PKCS#11 session is closed", self._where, "open a new signer")
        return self._session

    def _sign(self, data: bytes, mechanism: Any, param: Any) -> bytes:
        from pkcs11.types import SignMixin

        self._live_session()
        if not isinstance(self._key, SignMixin):
            raise UnsupportedError("the token's private key is not allowed to sign (CKA_SIGN is false)", self._where)
        try:
            return bytes(self._key.sign(data, mechanism=mechanism, mechanism_param=param))
        except Exception as e:
            raise _token_error(e, self._where) from None

    def sign_raw(self, data: bytes, digest: hashes.HashAlgorithm, *, algorithm: KeyAlgorithm | None = None) -> bytes:
        """Hash ``data`` locally with ``digest`` and have the token sign the digest."""
        h = hashes.Hash(digest)
        h.update(bytes(data))
        return self.sign_digest(h.finalize(), digest, algorithm=algorithm)

    def sign_digest(
        self, digest_value: bytes, digest: hashes.HashAlgorithm, *, algorithm: KeyAlgorithm | None = None
    ) -> bytes:
        """Have the token sign a precomputed ``digest`` value (only the digest leaves the host)."""
        from pkcs11 import MGF, Mechanism

        use = check_algorithm(self.key_algorithm, algorithm, self._where)
        if digest.name not in _DIGEST_INFO:
            raise UnsupportedError(
                f"hash {digest.name} not supported for token signing", self._where, "use sha256, sha384 or sha512"
            )
        if len(digest_value) != digest.digest_size:
            raise UnsupportedError(f"a {digest.name} digest is {digest.digest_size} bytes, got {len(digest_value)}")
        if use == KeyAlgorithm.RSA_PKCS1:
            return self._sign(_DIGEST_INFO[digest.name] + digest_value, Mechanism.RSA_PKCS, None)
        if use == KeyAlgorithm.RSA_PSS:
            hmech, mgf = {
                "sha256": (Mechanism.SHA256, MGF.SHA256),
                "sha384": (Mechanism.SHA384, MGF.SHA384),
                "sha512": (Mechanism.SHA512, MGF.SHA512),
            }[digest.name]
            return self._sign(digest_value, Mechanism.RSA_PKCS_PSS, (hmech, mgf, digest.digest_size))
        raw = self._sign(digest_value, Mechanism.ECDSA, None)
        n = len(raw) // 2
        return utils.encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))

    def close(self) -> None:
        """Close the token session."""
        s = getattr(self, "_session", None)
        if s is not None:
            with contextlib.suppress(Exception):  # a dead session cannot be closed twice; nothing to report
                s.close()
            self._session = None

    def describe(self) -> str:
        return f"{self.certificate.subject.rfc4514_string()} ({self._where})"

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


__all__ = ["DEFAULT_PIN_ENV", "MODULE_ENV", "Pkcs11Signer", "Pkcs11Uri", "parse_pkcs11_uri"]
