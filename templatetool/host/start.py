"""``host start VM.vhdx --kp VM.kp --hgs URL --host HOSTDIR``: the guarded host's whole path.

health certificate (cached or attest) → key release over the service → the VM secret → its
vTPM state key K → swtpm on ``VM.vtpm`` → QEMU (:mod:`templatetool.host.launch`). The console
policy is the VM secret's (``shielded``: none), never the host's choice. When the VM stops, the
vTPM state as swtpm left it (still encrypted under K) replaces ``VM.vtpm`` atomically, unless
``save_state`` is off.

The fabric's vTPM state ledger (:mod:`templatetool.hgs.ledger`): the release names the SHA-256
of the state about to boot (an older copy gets no key), and the new state is reported when the
VM stops. Crash-safe order: the report (previous, current, MAC under K: no secret) is written
to ``VM.vtpm-report`` (0600) first, then the state, then the report is sent and the file
removed. A report file left by an interrupted run is sent before the next release when the
state file is the state it reports, and dropped otherwise (the state never got written).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic
from ..errors import NotFoundError, TemplateToolError, UnsupportedError
from ..hgs.ledger import check_digest, state_mac, vm_id
from .health import DEFAULT_REFRESH_MARGIN, HealthStatus, attest_host, release_secret, report_state
from .launch import VmConfig, VmRun, run_vm

#: The per-VM swtpm state file beside the disk (written by ``shield``).
STATE_SUFFIX = ".vtpm"
#: A state report not yet acknowledged by the fabric, beside the state (``VM.vtpm-report``).
REPORT_SUFFIX = "-report"
MAX_STATE = 16 << 20


def state_path_for(disk: Path) -> Path:
    """``VM.vhdx`` → ``VM.vtpm``."""
    return disk.with_suffix(STATE_SUFFIX)


@dataclass
class StartResult:
    """What ``host start`` did."""

    health: HealthStatus
    policy: str
    run: VmRun
    state_path: Path
    state_saved: bool
    #: The ledger's generation of the saved state (None when nothing was reported).
    state_generation: int | None = None
    #: Why the new state's report did not reach the fabric (it is resent on the next start).
    report_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "health": self.health.to_json(),
            "policy": self.policy,
            "vm": self.run.to_json(),
            "vtpm_state": str(self.state_path),
            "vtpm_state_saved": self.state_saved,
            "vtpm_state_generation": self.state_generation,
            "vtpm_state_report_error": self.report_error,
        }


def report_path_for(state_path: Path) -> Path:
    """``VM.vtpm`` → ``VM.vtpm-report``."""
    return state_path.with_name(state_path.name + REPORT_SUFFIX)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pending_report(path: Path, state_sha: str) -> dict[str, str] | None:
    """A report left by an interrupted run, if it reports the state now on disk; else None (and
    the stale file is removed)."""
    try:
        doc = json.loads(path.read_bytes())
        rep = {k: check_digest(doc[k], k, str(path)) for k in ("previous", "current", "mac")}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, TemplateToolError):
        rep = None
    if rep is None or rep["current"] != state_sha:
        path.unlink(missing_ok=True)
        return None
    return rep


def vtpm_key_of(secret: bytes, where: str) -> tuple[bytes, str]:
    """(K, policy) from a released VM secret; UnsupportedError for a VM without a manufactured vTPM."""
    from ..pipeline.shield import VmSecret

    sec = VmSecret.from_bytes(secret)
    key = sec.vtpm_state_key
    if key is None:
        raise UnsupportedError(
            "this VM has no swtpm vTPM state (shielded with a software vTPM key)",
            where,
            "shield it again with a templatetool that manufactures the vTPM",
        )
    return key, sec.policy


def read_state(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_STATE:
            from ..errors import FormatError

            raise FormatError(f"vTPM state larger than {MAX_STATE} bytes", str(path))
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            "vTPM state not found",
            str(path),
            "shield writes VM.vtpm beside VM.vhdx; or give the state file's path",
            code="host.vtpm-state-missing",
        ) from None


def start_vm(
    disk: str | os.PathLike[str],
    kp: bytes,
    hgs_url: str,
    host_dir: str | os.PathLike[str],
    *,
    vtpm_state: str | os.PathLike[str] | None = None,
    save_state: bool = True,
    tpm: str | None = None,
    tcg_log: bytes | None = None,
    ci_policy_hash: str | None = None,
    refresh_margin: _dt.timedelta = DEFAULT_REFRESH_MARGIN,
    verify: Any = True,
    **vm: Any,
) -> StartResult:
    """Attest (or reuse the cached health certificate), release the VM's key, boot it; ``vm``
    are :class:`~templatetool.host.launch.VmConfig` fields (console, serial_log, accel, ...)."""
    d = Path(disk)
    sp = Path(vtpm_state) if vtpm_state is not None else state_path_for(d)
    state = read_state(sp)
    VmConfig(d, policy="encryption-supported", **vm).check()  # bad settings fail before any network call
    health = attest_host(
        hgs_url,
        host_dir,
        tpm=tpm,
        tcg_log=tcg_log,
        ci_policy_hash=ci_policy_hash,
        refresh_margin=refresh_margin,
        verify=verify,
    )
    h0 = _sha(state)
    rp = report_path_for(sp)
    pending = _pending_report(rp, h0)
    if pending is not None:  # the last run saved its state but the fabric may not know it yet
        report_state(hgs_url, kp, health, pending["previous"], pending["current"], pending["mac"], verify=verify)
        rp.unlink(missing_ok=True)
    secret = release_secret(hgs_url, host_dir, kp, health, verify=verify, vtpm_state_sha256=h0)
    key, policy = vtpm_key_of(secret, "key protector")
    run = run_vm(VmConfig(d, policy=policy, **vm), state, key)
    saved, generation, report_error = False, None, None
    if save_state and run.final_state != state:
        h1 = _sha(run.final_state)
        rep = {"previous": h0, "current": h1, "mac": state_mac(key, vm_id(key), h0, h1)}
        write_bytes_atomic(rp, json.dumps(rep, sort_keys=True).encode(), mode=0o600)
        write_bytes_atomic(sp, run.final_state, mode=0o600)
        saved = True
        try:
            _vm, generation, _cur = report_state(hgs_url, kp, health, h0, h1, rep["mac"], verify=verify)
            rp.unlink(missing_ok=True)
        except TemplateToolError as e:  # the VM ran and its state is saved; the report is resent next time
            report_error = str(e)
    return StartResult(health, policy, run, sp, saved, generation, report_error)


__all__ = [
    "REPORT_SUFFIX",
    "STATE_SUFFIX",
    "StartResult",
    "read_state",
    "report_path_for",
    "start_vm",
    "state_path_for",
    "vtpm_key_of",
]
