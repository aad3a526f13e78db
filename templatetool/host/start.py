"""``host start VM.vhdx --kp VM.kp --hgs URL --host HOSTDIR``: the guarded host's whole path.

health certificate (cached or attest) → key release over the service → the VM secret → its
vTPM state key K → swtpm on ``VM.vtpm`` → QEMU (:mod:`templatetool.host.launch`). The console
policy is the VM secret's (``shielded``: none), never the host's choice. When the VM stops, the
vTPM state as swtpm left it (still encrypted under K) replaces ``VM.vtpm`` atomically, unless
``save_state`` is off.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic
from ..errors import NotFoundError, UnsupportedError
from .health import DEFAULT_REFRESH_MARGIN, HealthStatus, attest_host, release_secret
from .launch import VmConfig, VmRun, run_vm

#: The per-VM swtpm state file beside the disk (written by ``shield``).
STATE_SUFFIX = ".vtpm"
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

    def to_json(self) -> dict[str, Any]:
        return {
            "health": self.health.to_json(),
            "policy": self.policy,
            "vm": self.run.to_json(),
            "vtpm_state": str(self.state_path),
            "vtpm_state_saved": self.state_saved,
        }


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
    key, policy = vtpm_key_of(release_secret(hgs_url, host_dir, kp, health, verify=verify), "key protector")
    run = run_vm(VmConfig(d, policy=policy, **vm), state, key)
    saved = False
    if save_state and run.final_state != state:
        write_bytes_atomic(sp, run.final_state, mode=0o600)
        saved = True
    return StartResult(health, policy, run, sp, saved)


__all__ = ["STATE_SUFFIX", "StartResult", "read_state", "start_vm", "state_path_for", "vtpm_key_of"]
