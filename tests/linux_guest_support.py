"""Test support for the Linux guest (tools/linux_guest.py): build it, boot it under the host
launcher with a vTPM, read what it printed."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import IN_CI, ROOT, require_tool

#: The host tools the guest build and boot need (besides those tools/linux_guest.py checks).
BOOT_TOOLS = ("qemu-system-x86_64", "swtpm", "swtpm_setup")


def guest_module() -> ModuleType:
    """tools/linux_guest.py as a module."""
    name = "tt_linux_guest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "linux_guest.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def require_guest() -> ModuleType:
    """Skip locally (fail in CI) when the guest cannot be built or booted here."""
    require_tool(*BOOT_TOOLS)
    lg = guest_module()
    miss = lg.missing_tools()
    if miss:
        msg = f"the Linux test guest needs {', '.join(miss)} (Debian packages: make deps)"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    return lg


def build_golden(out: Path, marker: str, *, extend7: bool = False) -> Path:
    """A golden Linux disk (raw GPT: ESP with the UKI, plain ext4 root holding ``marker``)."""
    lg = require_guest()
    try:
        return lg.build_disk(out, marker, extend7=extend7)  # type: ignore[no-any-return]
    except lg.GuestBuildError as e:
        msg = f"cannot build the Linux test guest: {e}"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
        raise


def boot(disk: Path, state: bytes, key: bytes, serial: Path, *, policy: str = "encryption-supported") -> tuple[Any, dict[str, Any]]:
    """Boot ``disk`` under the host launcher (TCG here) with the vTPM ``state`` under ``key``;
    returns (VmRun, what the guest printed)."""
    from templatetool.host.launch import VmConfig, run_vm

    cfg = VmConfig(disk, policy=policy, serial_log=serial, memory_mib=512, cpus=1, no_reboot=True, timeout=300)
    t0 = time.monotonic()
    run = run_vm(cfg, state, key)
    print(f"\nguest boot {disk.name}: {time.monotonic() - t0:.1f} s under {run.accel}, exit {run.exit_code}")
    return run, guest_module().parse_serial(serial.read_bytes().decode(errors="replace"))


def reference_boot(workdir: Path) -> dict[str, Any]:
    """The fabric's reference boot: the plain guest on a fresh vTPM; its TCG log and the PCR 7
    the log replays to."""
    from templatetool.tpm.eventlog import parse_log
    from templatetool.tpm.protector import resolve_pcr_values
    from templatetool.tpm.vtpm_manufacture import manufacture_vtpm

    disk = build_golden(workdir / "reference.img", "reference boot")
    v = manufacture_vtpm()
    run, out = boot(disk, v.state, v.key, workdir / "reference.serial")
    assert run.exit_code == 0 and out["marker"] == "reference boot", out
    log = out["tcg_log"]
    assert isinstance(log, bytes) and log, "the guest printed no TCG log"
    parse_log(log, "guest TCG log")
    pcr7 = resolve_pcr_values([7], "sha256", tcg_log=log)[7]
    return {"log": log, "pcr7": pcr7, "seconds": run.seconds}
