"""shield manufactures the VM's vTPM in the background: swtpm_setup runs while the checks and the
disk pass run, is waited for when the VMK is sealed, and is killed (its directory removed) when
anything fails. Judged with a wrapper around the real swtpm_setup that logs when it starts and
ends, and by the outputs (the state still opens; nothing left behind on failure)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from templatetool.errors import ResourceError, TemplateToolError

from .conftest import GOLDEN, require_module, require_tool


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tool("swtpm", "swtpm_setup")
    require_module("tpm2_pytss")
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    from templatetool.pipeline.demo import run_demo

    d = tmp_path_factory.mktemp("bgvtpm")
    run_demo(GOLDEN, d, say=lambda s: None)
    return {"dir": d}


def _wrapper(where: Path, log: Path, *, delay: float = 0.0, fail: bool = False) -> Path:
    """A swtpm_setup that appends 'start <t>' / 'end <t>' to ``log`` around the real one."""
    real = shutil.which("swtpm_setup")
    assert real
    body = f'echo "start $(date +%s.%N)" >> {log}\n'
    if delay:
        body += f"sleep {delay}\n"
    if fail:
        body += 'echo "swtpm_setup: simulated failure" >&2\nexit 3\n'
    else:
        body += f'"{real}" "$@"\nrc=$?\necho "end $(date +%s.%N)" >> {log}\nexit $rc\n'
    w = where / "swtpm_setup"
    w.write_text("#!/bin/sh\n" + body)
    w.chmod(w.stat().st_mode | stat.S_IXUSR)
    return w


def _events(log: Path) -> dict[str, float]:
    return {k: float(v) for k, v in (ln.split() for ln in log.read_text().splitlines())}


def _shield(fabric: dict[str, Any], out: Path, **kw: Any) -> dict[str, Any]:
    from templatetool.guardian.model import load_guardian
    from templatetool.pipeline.shield import shield

    d = fabric["dir"]
    return shield(d / "template.vhdx", kw.pop("pdk", d / "tenant.pdk"), out, load_guardian(d / "owner", private=True),
                  tcg_log=d / "vm-reference.tcglog", guardians=[load_guardian(d / "fabric")], **kw)


def test_swtpm_setup_runs_during_the_disk_pass(fabric: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """swtpm_setup starts before the disk pass and (held 1.5 s) is still running when the pass
    starts; the shielded VM's vTPM state is still the real one (it opens with K, SRK sealed)."""
    import templatetool.pipeline.encrypt as enc_mod
    from templatetool.guardian.model import load_guardian
    from templatetool.kp import unwrap
    from templatetool.pipeline.shield import VmSecret
    from templatetool.tpm import vtpm_manufacture as vm

    log = tmp_path / "events"
    w = _wrapper(tmp_path, log, delay=1.5)
    real_tool = vm._tool
    monkeypatch.setattr(vm, "_tool", lambda name: str(w) if name == "swtpm_setup" else real_tool(name))
    real_encrypt = enc_mod.encrypt_disk
    passes: list[float] = []

    def timed_encrypt(*a: Any, **k: Any) -> Any:
        passes.append(time.time())
        r = real_encrypt(*a, **k)
        passes.append(time.time())
        return r

    monkeypatch.setattr(enc_mod, "encrypt_disk", timed_encrypt)
    rep = _shield(fabric, tmp_path / "vm.vhdx", verify_content=True)
    ev = _events(log)
    assert ev["start"] < passes[0] < ev["end"], (ev, passes)  # overlapped, not before the pass
    t = rep["timings_s"]
    assert t["vtpm"] == pytest.approx(t["vtpm_start"] + t["vtpm_wait"], abs=0.002)
    secret = VmSecret.from_bytes(unwrap((tmp_path / "vm.kp").read_bytes(), load_guardian(fabric["dir"] / "owner", private=True)))
    state = (tmp_path / "vm.vtpm").read_bytes()
    with vm.start_vtpm(state, secret.vtpm_state_key or b"") as sw:  # swtpm opens it with K
        assert vm.read_srk_name(sw.tcti).hex() == secret.parent_name == rep["vtpm"]["srk_name"]


def test_failed_checks_kill_the_manufacture(fabric: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A PDK that does not verify stops shield while swtpm_setup runs: it is killed (never
    reaches 'end'), its private directory is gone and no output appears."""
    from templatetool.tpm import vtpm_manufacture as vm

    log = tmp_path / "events"
    w = _wrapper(tmp_path, log, delay=3)
    real_tool = vm._tool
    monkeypatch.setattr(vm, "_tool", lambda name: str(w) if name == "swtpm_setup" else real_tool(name))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bad = tmp_path / "bad.pdk"
    pdk = bytearray((fabric["dir"] / "tenant.pdk").read_bytes())
    pdk[len(pdk) // 2] ^= 1
    bad.write_bytes(bytes(pdk))
    with pytest.raises(TemplateToolError):
        _shield(fabric, tmp_path / "vm.vhdx", pdk=bad)
    time.sleep(3.5)  # a swtpm_setup left running would log 'end' by now
    assert "end" not in _events(log), log.read_text()
    assert not list(scratch.glob("vtpm-mfg-*"))
    assert not list(tmp_path.glob("vm*")) and not list(tmp_path.glob(".vm*"))


def test_pending_vtpm_reports_the_tools_message_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("swtpm", "swtpm_setup")
    from templatetool.tpm import vtpm_manufacture as vm

    log = tmp_path / "events"
    monkeypatch.setattr(vm, "_tool", lambda name: str(_wrapper(tmp_path, log, fail=True)))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with vm.begin_manufacture() as pending, pytest.raises(ResourceError, match="exit 3.*simulated failure"):
        pending.result()
    assert not list(scratch.iterdir())
    # abandoned while running: killed, directory removed
    monkeypatch.setattr(vm, "_tool", lambda name: str(_wrapper(tmp_path, log, delay=2)))
    p = vm.begin_manufacture()
    assert list(scratch.glob("vtpm-mfg-*"))
    p.close()
    assert not list(scratch.glob("vtpm-mfg-*"))
    with pytest.raises(ResourceError, match="abandoned"):
        p.result()


def test_swtpm_setup_failing_during_the_pass_leaves_no_output(fabric: dict[str, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """swtpm_setup fails while the disk pass runs: shield stops with swtpm_setup's own message
    (a ResourceError, exit 8 in the CLI) when the VMK is to be sealed, and leaves no disk, KP,
    vTPM state, escrow or partial file."""
    from templatetool.tpm import vtpm_manufacture as vm

    log = tmp_path / "events"
    w = _wrapper(tmp_path, log, delay=0.5, fail=True)
    real_tool = vm._tool
    monkeypatch.setattr(vm, "_tool", lambda name: str(w) if name == "swtpm_setup" else real_tool(name))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ResourceError, match="simulated failure"):
        _shield(fabric, out_dir / "vm.vhdx", verify_content=False)
    assert "start" in _events(log)
    assert not list(out_dir.iterdir()), list(out_dir.iterdir())
