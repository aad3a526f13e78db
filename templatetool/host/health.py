"""``host attest``: a guarded host's health certificate from an ``hgs serve`` fabric, cached.

The certificate is kept in the host folder (``health/<id>.json``, 0600, one file per HGS URL) and
reused while it is valid for at least ``refresh_margin`` more; otherwise the host attests again
(host-key mode, or TPM mode: a TPM quote by the host's TPM, swtpm standing in for it in tests).
A cached certificate is only reused when it is for this host's encryption key and was issued for
the same HGS URL and attestation mode. Format: docs/tutorials/guarded-fabric.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..atomic import write_bytes_atomic
from ..errors import FormatError, UsageError
from ..hgs.host import Host, load_host, pem_public

#: Reattest when less than this is left of the health certificate (its default lifetime is 8 h).
DEFAULT_REFRESH_MARGIN = _dt.timedelta(hours=1)
CACHE_DIR = "health"
CACHE_FORMAT = "templatetool-health-cache"


@dataclass(frozen=True)
class HealthStatus:
    """A host's health certificate for one fabric, and whether it came from the cache."""

    certificate: x509.Certificate
    hgs: str
    mode: str
    cached: bool
    path: Path

    @property
    def valid_to(self) -> _dt.datetime:
        return self.certificate.not_valid_after_utc

    def to_json(self) -> dict[str, Any]:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return {
            "hgs": self.hgs,
            "mode": self.mode,
            "cached": self.cached,
            "cache": str(self.path),
            "fingerprint": hashlib.sha256(der).hexdigest(),
            "valid_from": self.certificate.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valid_to": self.valid_to.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def parse_duration(text: str) -> _dt.timedelta:
    """``90s``, ``30m``, ``2h``, ``1d`` or a number of seconds; UsageError otherwise."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    mult = units.get(t[-1:])
    num = t[:-1] if mult else t
    try:
        v = float(num)
    except ValueError:
        raise UsageError(f"not a duration: {text!r}", hint="e.g. 90s, 30m, 2h") from None
    if not 0 <= v <= 30 * 86400:
        raise UsageError(f"duration out of range: {text!r}")
    return _dt.timedelta(seconds=v * (mult or 1))


def _normal_url(url: str) -> str:
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise UsageError(f"--hgs must be an http:// or https:// URL, got {url!r}")
    return u


def cache_path(host_dir: str | os.PathLike[str], hgs_url: str) -> Path:
    """Where the health certificate for ``hgs_url`` is cached in the host folder."""
    ident = hashlib.sha256(_normal_url(hgs_url).encode()).hexdigest()[:16]
    return Path(host_dir) / CACHE_DIR / f"{ident}.json"


def _same_key(cert: x509.Certificate, host: Host) -> bool:
    return pem_public(cert.public_key()) == pem_public(host.encryption_key.public_key())


def cached_health(
    host_dir: str | os.PathLike[str],
    hgs_url: str,
    *,
    mode: str | None = None,
    margin: _dt.timedelta = DEFAULT_REFRESH_MARGIN,
    at: _dt.datetime | None = None,
    host: Host | None = None,
) -> HealthStatus | None:
    """The cached health certificate if it is still good for ``margin`` (and matches the host's
    encryption key, the URL and ``mode`` when given); None when it must be refreshed. A corrupt
    cache file is treated as absent (it is rewritten by the next attestation)."""
    url = _normal_url(hgs_url)
    p = cache_path(host_dir, url)
    now = at or _dt.datetime.now(_dt.UTC)
    host = host or load_host(host_dir)
    try:
        doc = json.loads(p.read_bytes())
        if doc.get("format") != CACHE_FORMAT or doc.get("hgs") != url:
            return None
        cert = x509.load_pem_x509_certificate(str(doc["health_certificate"]).encode())
        got_mode = str(doc["mode"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if mode is not None and got_mode != mode:
        return None
    if not _same_key(cert, host):
        return None
    if now < cert.not_valid_before_utc or now + margin >= cert.not_valid_after_utc:
        return None
    return HealthStatus(cert, url, got_mode, True, p)


def _store(p: Path, url: str, mode: str, cert: x509.Certificate) -> None:
    p.parent.mkdir(mode=0o700, exist_ok=True)
    doc = {
        "format": CACHE_FORMAT,
        "version": 1,
        "hgs": url,
        "mode": mode,
        "health_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }
    write_bytes_atomic(p, json.dumps(doc, indent=2).encode(), mode=0o600)


def attest_host(
    hgs_url: str,
    host_dir: str | os.PathLike[str],
    *,
    tpm: str | None = None,
    tcg_log: bytes | None = None,
    ci_policy_hash: str | None = None,
    refresh_margin: _dt.timedelta = DEFAULT_REFRESH_MARGIN,
    force: bool = False,
    verify: Any = True,
    at: _dt.datetime | None = None,
) -> HealthStatus:
    """The host's health certificate for ``hgs_url``: from the cache while valid for
    ``refresh_margin`` more, else by attesting (host-key mode; TPM mode when ``tpm`` names a TCTI,
    with the host's TCG log ``tcg_log``). Refusals are the service's typed errors (PolicyError for
    a failed check, ResourceError for an unreachable service)."""
    from ..hgs.client import HgsClient

    url = _normal_url(hgs_url)
    if tpm is not None and tcg_log is None:
        raise UsageError(
            "TPM attestation needs the host's TCG log", hint="give the host's TCG log", code="host.tcg-log-needed"
        )
    if tpm is None and (tcg_log is not None or ci_policy_hash is not None):
        raise UsageError("--tcg-log and --ci-policy-hash need --tpm")
    host = load_host(host_dir)
    mode = "tpm" if tpm else "host-key"
    if not force:
        hit = cached_health(host_dir, url, mode=mode, margin=refresh_margin, at=at, host=host)
        if hit is not None:
            return hit
    with HgsClient(url, verify=verify) as c:
        if tpm is not None:
            from ..hgs.tpmhost import TpmHost

            assert tcg_log is not None
            with TpmHost(tpm) as th:
                cert = c.attest_tpm(host, th, tcg_log, ci_policy_hash=ci_policy_hash)
        else:
            cert = c.attest(host)
    if not _same_key(cert, host):
        raise FormatError("the service issued a health certificate for another key", url)
    p = cache_path(host_dir, url)
    _store(p, url, mode, cert)
    return HealthStatus(cert, url, mode, False, p)


def release_secret(
    hgs_url: str,
    host_dir: str | os.PathLike[str],
    kp: bytes,
    health: HealthStatus,
    *,
    verify: Any = True,
    vtpm_state_sha256: str | None = None,
) -> bytes:
    """Key release over the service ([MS-KPS] RollTransportKey): the KP's secret, opened with the
    host's encryption key. Refused (typed error, no key) unless the fabric is a guardian of the KP
    and the health certificate is one it issued and still valid; for a VM with a vTPM state,
    unless ``vtpm_state_sha256`` is the latest state the fabric's ledger holds (hgs/ledger.py)."""
    from ..hgs.client import HgsClient

    host = load_host(host_dir)
    with HgsClient(_normal_url(hgs_url), verify=verify) as c:
        return c.release(kp, host, health.certificate, vtpm_state_sha256)


def report_state(
    hgs_url: str, kp: bytes, health: HealthStatus, previous: str, current: str, mac: str, *, verify: Any = True
) -> tuple[str, int, str]:
    """Report a VM's new vTPM state to the fabric's ledger; returns (vm id, generation, current)."""
    from ..hgs.client import HgsClient

    with HgsClient(_normal_url(hgs_url), verify=verify) as c:
        return c.report_vtpm_state(kp, health.certificate, previous, current, mac)


__all__ = [
    "DEFAULT_REFRESH_MARGIN",
    "HealthStatus",
    "attest_host",
    "cache_path",
    "cached_health",
    "parse_duration",
    "release_secret",
    "report_state",
]
