"""A (simulated) guarded host: its host key, its encryption key, and evidence files it produces."""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..atomic import write_bytes_atomic
from ..canonical import canonical_json
from ..errors import FormatError, NotFoundError, UsageError
from ..guardian.sigalg import sign_bytes
from ..signers.certs import new_key

EVIDENCE_FORMAT = "templatetool-host-evidence"
EVIDENCE_VERSION = 1
MAX_EVIDENCE = 4 << 20


@dataclass
class Host:
    """A host identity: ``host_key`` signs evidence; ``encryption_key`` receives released keys."""

    name: str
    host_key: Any
    encryption_key: Any
    path: str | None = None

    def public_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "host_key": pem_public(self.host_key.public_key()),
            "encryption_key": pem_public(self.encryption_key.public_key()),
        }


def pem_public(pub: Any) -> str:
    """SubjectPublicKeyInfo PEM text of a public key."""
    pem: bytes = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode()


def load_public(pem: str, what: str, where: str) -> Any:
    """Load a PEM public key (RSA or EC) or raise FormatError."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, AttributeError):
        raise FormatError(f"{what} is not a PEM public key", where) from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise FormatError(f"{what}: only RSA and EC keys are supported", where)
    return key


def new_host(name: str, folder: str | os.PathLike[str], key: str = "rsa3072") -> Host:
    """Create a host identity in ``folder``: host_key.pem and encryption_key.pem (0600), host.json."""
    if not name or len(name) > 64:
        raise UsageError("host name must be 1-64 characters")
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    host = Host(name, new_key(key), new_key(key), str(d))
    for fname, k in (("host_key.pem", host.host_key), ("encryption_key.pem", host.encryption_key)):
        write_bytes_atomic(
            d / fname,
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            mode=0o600,
        )
    write_bytes_atomic(d / "host.json", json.dumps(host.public_json(), indent=2).encode())
    return host


def load_host(folder: str | os.PathLike[str]) -> Host:
    """Load a host identity folder made by :func:`new_host`."""
    d = Path(folder)
    try:
        meta = json.loads((d / "host.json").read_text())
        keys = [
            serialization.load_pem_private_key((d / f).read_bytes(), None)
            for f in ("host_key.pem", "encryption_key.pem")
        ]
    except FileNotFoundError as e:
        raise NotFoundError("not a host folder (missing file)", str(e.filename), "create one with `host new`") from None
    except (ValueError, TypeError, json.JSONDecodeError):
        raise FormatError("host folder is corrupt", str(d)) from None
    return Host(str(meta.get("name", d.name)), keys[0], keys[1], str(d))


def _canonical(obj: dict[str, Any]) -> bytes:
    return canonical_json(obj)


def create_evidence(
    host: Host,
    *,
    tcg_log: bytes | None = None,
    ek_public_pem: str | None = None,
    ci_policy_hash: str | None = None,
    nonce: str | None = None,
    at: _dt.datetime | None = None,
) -> bytes:
    """Evidence JSON signed by the host key: host key, encryption key and (TPM mode) EK + TCG log + CI hash."""
    now = at or _dt.datetime.now(_dt.UTC)
    body: dict[str, Any] = {
        "format": EVIDENCE_FORMAT,
        "version": EVIDENCE_VERSION,
        "host": host.name,
        "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nonce": nonce or base64.b64encode(os.urandom(16)).decode(),
        "host_key": pem_public(host.host_key.public_key()),
        "encryption_key": pem_public(host.encryption_key.public_key()),
    }
    if tcg_log is not None:
        body["tpm"] = {
            "ek_public": ek_public_pem,
            "tcg_log": base64.b64encode(tcg_log).decode(),
            "ci_policy_hash": ci_policy_hash,
        }
    alg, sig = sign_bytes(host.host_key, _canonical(body))
    return json.dumps(
        {"evidence": body, "signature_algorithm": alg, "signature": base64.b64encode(sig).decode()}, indent=2
    ).encode()


__all__ = ["MAX_EVIDENCE", "Host", "create_evidence", "load_host", "load_public", "new_host", "pem_public"]
