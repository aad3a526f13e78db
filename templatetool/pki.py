"""Certificate path validation: the one place a certificate chain is judged.

Every trust decision — guardian metadata import, guardian and PDK owner checks, CMS signers
(VSC catalogs, PDKs), health certificates — calls :func:`verify_chain`. The judge is
``cryptography.x509.verification`` (RFC 5280 path building and validation, maintained by
pyca): issuers must be CAs (basicConstraints cA=TRUE) with keyCertSign, path length
constraints hold, every certificate is valid at the validation time, signatures verify with the
accepted algorithms (RSA PKCS#1 v1.5 and RSASSA-PSS with SHA-2, ECDSA P-256/384/521) and RSA keys
have at least 2048 bits. Our layer on top:

* a trust-anchor choice for ``allow_untrusted_root`` (the chain's own top certificate becomes
  the anchor, like ``-AllowUntrustedRoot``; its self-signature must still verify);
* ``allow_expired``: validity is judged at a time inside every certificate's validity period;
* an extended key usage requirement for the leaf (``eku``);
* one-line reasons: when the verifier refuses, the candidate path is walked again to name the
  certificate and the rule ("issuer X is not a CA (basicConstraints)", "... lacks keyCertSign",
  "intermediate X expired on ...", "wrong extended key usage", "path length exceeded").

Refusals are :class:`PolicyError`; a certificate that names an issuer we hold but whose
signature does not verify with that issuer's key (or a self-signed one whose self-signature
fails) is an :class:`IntegrityError`; a damaged certificate name a :class:`FormatError`.
See docs/pki.md.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import verification as _v
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import FormatError, IntegrityError, PolicyError

#: Longest chain accepted (leaf + intermediates + anchor).
MAX_DEPTH = 8
#: Smallest RSA modulus cryptography's verifier accepts for an issuer (the key checking a signature).
MIN_RSA_BITS = 2048


@dataclass
class VerifiedPath:
    """A validated chain: ``chain[0]`` is the leaf, ``chain[-1]`` the trust anchor."""

    chain: list[x509.Certificate]
    #: False when the anchor was not among the trust roots (accepted by ``allow_untrusted_root``).
    trusted: bool
    #: The time validity was judged at.
    validated_at: _dt.datetime

    @property
    def anchor(self) -> x509.Certificate:
        """The trust anchor the chain ends at."""
        return self.chain[-1]


def _der(c: x509.Certificate) -> bytes:
    return c.public_bytes(serialization.Encoding.DER)


def _subj(c: x509.Certificate) -> str:
    try:
        return c.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        return "(malformed subject)"


_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(c: x509.Certificate, cls: type[_E]) -> _E | None:
    try:
        return c.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:  # a malformed extension: the verifier refuses it too
        return None


def _signed_by(child: x509.Certificate, parent: x509.Certificate, where: str = "certificate chain") -> bool:
    """True when ``parent``'s key verifies ``child``'s signature; PolicyError for a refused algorithm."""
    try:
        child.verify_directly_issued_by(parent)
        return True
    except (UnsupportedAlgorithm, ValueError) as e:
        if isinstance(e, ValueError) and "signature algorithm" not in str(e).lower():
            return False
        alg = getattr(child.signature_algorithm_oid, "_name", child.signature_algorithm_oid.dotted_string)
        raise PolicyError(
            f"{_subj(child)} is signed with {alg}, which is not accepted", where, "reissue it with SHA-256 or stronger"
        ) from None
    except (InvalidSignature, TypeError):
        return False


def _names_match(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        return child.issuer == parent.subject
    except ValueError:  # a damaged candidate cannot be the issuer
        return False


def _self_issued(c: x509.Certificate, where: str) -> bool:
    try:
        return c.issuer == c.subject
    except ValueError as e:  # names are parsed lazily: a damaged subject/issuer fails here
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise FormatError(
            f"malformed certificate name: {msg}", where, "the certificate is damaged; give the original file"
        ) from None


def _as_utc(t: _dt.datetime | None) -> _dt.datetime:
    if t is None:
        return _dt.datetime.now(_dt.UTC)
    return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)


def _walk(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate], anchors: set[bytes], where: str, max_depth: int
) -> tuple[list[x509.Certificate], str]:
    """The candidate path by names and signatures; status ``anchor|self-signed|no-issuer|too-long``.

    Used to pick the anchor for ``allow_untrusted_root``, the time for ``allow_expired`` and to
    explain a refusal; the verifier makes the decision. IntegrityError when a certificate's
    issuer is held but no certificate of that name verifies its signature.
    """
    path = [leaf]
    cur = leaf
    while True:
        if _der(cur) in anchors:
            return path, "anchor"
        if _self_issued(cur, where):
            if not _signed_by(cur, cur, where):
                raise IntegrityError(
                    "the self-signed certificate's signature does not verify",
                    f"{where}: {_subj(cur)}",
                    "the certificate was altered",
                )
            return path, "self-signed"
        if len(path) >= max_depth:
            return path, "too-long"
        seen = {_der(c) for c in path}
        named = [c for c in pool if _der(c) not in seen and _names_match(cur, c)]
        if not named:
            return path, "no-issuer"
        good = [c for c in named if _signed_by(cur, c, where)]
        if not good:
            raise IntegrityError(
                f"the signature of {_subj(cur)} does not verify with the key of its issuer {_subj(named[0])}",
                where,
                "the certificate was altered or another CA of that name issued it",
            )
        good.sort(key=lambda c: _der(c) not in anchors)  # prefer a trust anchor
        cur = good[0]
        path.append(cur)


def _ca_keycertsign(_policy: object, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is None or not ku.key_cert_sign:
        raise ValueError(f"issuer {_subj(cert)} lacks keyCertSign (keyUsage)")


def _ca_policy() -> _v.ExtensionPolicy:
    return (
        _v.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, _v.Criticality.AGNOSTIC, None)
        .require_present(x509.KeyUsage, _v.Criticality.AGNOSTIC, _ca_keycertsign)
    )


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    name = getattr(oid, "_name", "Unknown OID")
    return oid.dotted_string if name == "Unknown OID" else f"{name} ({oid.dotted_string})"


def _ee_policy(eku: x509.ObjectIdentifier | None) -> _v.ExtensionPolicy:
    pol = _v.ExtensionPolicy.permit_all()
    if eku is None:
        return pol

    def check(_policy: object, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
        if ext is None or eku not in list(ext):
            raise ValueError(f"wrong extended key usage: {_subj(cert)} is not issued for {_eku_name(eku)}")

    return pol.require_present(x509.ExtendedKeyUsage, _v.Criticality.AGNOSTIC, check)


def _validity_window(path: Sequence[x509.Certificate]) -> tuple[_dt.datetime, _dt.datetime]:
    return max(c.not_valid_before_utc for c in path), min(c.not_valid_after_utc for c in path)


def _explain(
    path: list[x509.Certificate], anchor_idx: int, at: _dt.datetime, eku: x509.ObjectIdentifier | None, what: str
) -> str | None:
    """Name the first rule the candidate path breaks (the verifier's refusal, in one line)."""
    leaf = path[0]
    if at > leaf.not_valid_after_utc:
        return f"{what} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if at < leaf.not_valid_before_utc:
        return f"{what} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if eku is not None:
        ext = _ext(leaf, x509.ExtendedKeyUsage)
        if ext is None or eku not in list(ext):
            return f"wrong extended key usage: {_subj(leaf)} is not issued for {_eku_name(eku)}"
    for k, c in enumerate(path):
        if k == 0:
            continue
        pub = c.public_key()  # an issuer's key verifies the signature below it
        if isinstance(pub, rsa.RSAPublicKey) and pub.key_size < MIN_RSA_BITS:
            return f"the RSA key of issuer {_subj(c)} is too weak ({pub.key_size} bits, {MIN_RSA_BITS} needed)"
        role = "root" if k == anchor_idx else "intermediate"
        bc = _ext(c, x509.BasicConstraints)
        if bc is None or not bc.ca:
            return f"issuer {_subj(c)} is not a CA (basicConstraints)"
        ku = _ext(c, x509.KeyUsage)
        if ku is None or not ku.key_cert_sign:
            return f"issuer {_subj(c)} lacks keyCertSign (keyUsage)"
        if at > c.not_valid_after_utc:
            return f"{role} {_subj(c)} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if at < c.not_valid_before_utc:
            return f"{role} {_subj(c)} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        below = sum(1 for i in path[1:k] if not _names_match(i, i))
        if bc.path_length is not None and below > bc.path_length:
            return (
                f"path length exceeded: {_subj(c)} allows {bc.path_length} intermediate CA(s) "
                f"below it, the chain has {below}"
            )
    return None


def _clean(e: Exception) -> str:
    msg = (str(e).splitlines() or [type(e).__name__])[0]
    for prefix in ("validation failed: ", "candidates exhausted: "):
        msg = msg.replace(prefix, "")
    msg = msg.split(" (encountered processing")[0]
    return msg.replace("Python extension validator failed: ValueError: ", "")[:200]


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate] = (),
    trust_roots: Sequence[x509.Certificate] = (),
    *,
    at: _dt.datetime | None = None,
    eku: x509.ObjectIdentifier | None = None,
    allow_untrusted_root: bool = False,
    allow_expired: bool = False,
    where: str = "certificate",
    what: str = "certificate",
    max_depth: int = MAX_DEPTH,
) -> VerifiedPath:
    """Validate ``leaf`` up to one of ``trust_roots``; return the path (leaf first, anchor last).

    ``intermediates`` are untrusted certificates that may complete the path. A trust root may be
    the leaf itself (a pinned certificate). ``at`` is the validation time (default now).
    ``eku``: the leaf must carry an ExtendedKeyUsage extension listing this OID.
    ``allow_untrusted_root``: when the path does not reach a trust root, its top certificate
    (self-signed, or the last one whose issuer is not given) is used as the anchor — every
    other rule still applies. ``allow_expired``: judge validity at a time inside every
    certificate's validity period (refused when the periods do not overlap).
    ``what`` names the leaf in messages, ``where`` is the error location.

    Raises PolicyError with a one-line reason, or IntegrityError for a signature that does not
    verify with the issuer's key.
    """
    now = _as_utc(at)
    roots = [c for c in trust_roots if _subj(c) != "(malformed subject)"]
    anchors = {_der(c) for c in roots}
    pool = [*intermediates, *roots]
    path, status = _walk(leaf, pool, anchors, where, max_depth)
    store = list(roots)
    if status != "anchor":
        if status == "too-long":
            raise PolicyError(f"certificate chain too long (more than {max_depth} certificates)", where)
        if not allow_untrusted_root:
            if status == "self-signed":
                raise PolicyError(
                    f"the {what} chains to an untrusted root: {_subj(path[-1])} is not trusted",
                    where,
                    "add the root to the trust anchors, or allow an untrusted root (self-signed guardians)",
                    code="pki.untrusted-root",
                )
            raise PolicyError(
                f"cannot find the issuer {path[-1].issuer.rfc4514_string()} of {_subj(path[-1])}, "
                f"so the {what} does not chain to a trusted root",
                where,
                "add the issuing CA to the trust anchors, or allow an untrusted root",
                code="pki.untrusted-ca",
            )
        store.append(path[-1])
    check_at = now
    if allow_expired:
        lo, hi = _validity_window(path)
        if lo > hi:
            raise PolicyError("the validity periods of the certificates in the chain do not overlap", where)
        check_at = min(max(now, lo), hi)
    try:
        builder = (
            _v.PolicyBuilder()
            .store(_v.Store(store))
            .time(check_at)
            .max_chain_depth(max_depth)
            .extension_policies(ca_policy=_ca_policy(), ee_policy=_ee_policy(eku))
        )
        chain = builder.build_client_verifier().verify(leaf, list(intermediates)).chain
    except (_v.VerificationError, ValueError, TypeError) as e:
        try:
            reason = _explain(path, len(path) - 1, check_at, eku, what) or _clean(e)
        except (ValueError, TypeError, UnsupportedAlgorithm):  # a damaged certificate: the verifier's words
            reason = _clean(e)
        if " expired on " in reason or " is not valid before " in reason:
            hint = "renew the certificate, or allow expired certificates to judge the chain inside its validity periods"
            code = "pki.expired"
        else:
            hint = "the certificate chain does not satisfy X.509 path validation (RFC 5280)"
            code = "pki.invalid-chain"
        raise PolicyError(
            reason, f"{where}: {_subj(leaf)}" if _subj(leaf) not in reason else where, hint, code=code
        ) from None
    return VerifiedPath(list(chain), _der(chain[-1]) in anchors, check_at)


#: Convenience re-export for callers that want to require code signing.
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING

__all__ = ["CODE_SIGNING", "MAX_DEPTH", "MIN_RSA_BITS", "VerifiedPath", "verify_chain"]
