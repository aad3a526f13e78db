"""shield gives every VM a real swtpm vTPM (VM.vtpm + K in the KP); unlock unseals through it.

One demo pipeline per module (protect → PDK → shield with a manufactured vTPM → dry run →
unlock); each refusal is its own test and judged by what comes out: the exit code, the failed
step, and that no VMK / no decrypted disk appears.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from templatetool.errors import FormatError, IntegrityError, PolicyError, ResourceError

from .conftest import GOLDEN, assert_clean_error, require_module, require_tool, run_cli, run_inprocess

pytestmark = pytest.mark.usefixtures("_tools")


@pytest.fixture(scope="module")
def _tools() -> None:
    require_tool("swtpm", "swtpm_setup")
    require_module("tpm2_pytss")
    os.environ.setdefault("TSS2_LOG", "all+NONE")


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory, _tools: None) -> dict[str, Any]:
    """The demo's shielded VM (swtpm vTPM, the default), its secret and a second VM of the same template."""
    from templatetool.guardian.model import load_guardian
    from templatetool.kp import unwrap
    from templatetool.pipeline.demo import run_demo
    from templatetool.pipeline.shield import VmSecret, shield

    d = tmp_path_factory.mktemp("vtpm")
    rep = run_demo(GOLDEN, d, say=lambda s: None)
    owner = load_guardian(d / "owner", private=True)
    secret = VmSecret.from_bytes(unwrap((d / "vm.kp").read_bytes(), owner))
    other = d / "other"
    other.mkdir()
    shield(d / "template.vhdx", d / "tenant.pdk", other / "vm.vhdx", owner, tcg_log=d / "vm-reference.tcglog",
           guardians=[load_guardian(d / "fabric")], verify_content=False)
    return {"dir": d, "report": rep, "secret": secret, "owner": owner, "other": other}


def _vm_copy(vm: dict[str, Any], where: Path, state: bytes | None = None) -> Path:
    """vm.vhdx + vm.kp in ``where`` (links) with ``state`` (default: the VM's own) as vm.vtpm beside."""
    d = vm["dir"]
    where.mkdir(exist_ok=True)
    (where / "vm.vhdx").symlink_to(d / "vm.vhdx")
    (where / "vm.kp").symlink_to(d / "vm.kp")
    (where / "vm.vtpm").write_bytes((d / "vm.vtpm").read_bytes() if state is None else state)
    return where / "vm.vhdx"


def _kp_with(vm: dict[str, Any], **changes: Any) -> bytes:
    """A KP made by the owner for the fabric, carrying the VM's secret with ``changes``."""
    from dataclasses import replace

    from templatetool.guardian.model import load_guardian
    from templatetool.kp import create_kp

    sec = replace(vm["secret"], **changes)
    return create_kp(sec.to_bytes(), vm["owner"], [load_guardian(vm["dir"] / "fabric", private=True)])


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> Any:
    """The CLI in this process (a subprocess per refusal would cost seconds each)."""
    code, out, err = run_inprocess(capsys, *args)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def _unlock_cli(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], disk: Path, kp: Path, *extra: str) -> Any:
    d = vm["dir"]
    return _cli(capsys, "unlock", disk, "--kp", kp, "--guardian", d / "fabric", "--host", d / "host", "--json", *extra)


def _steps(cp: Any) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in json.loads(cp.stdout)["result"]["steps"]}


# --- what shield writes ------------------------------------------------------------------------


def test_shield_writes_the_vtpm_state_and_a_v2_secret(vm: dict[str, Any]) -> None:
    from templatetool.tpm.swtpm_state import decrypt_state, parse_state

    d, sec = vm["dir"], vm["secret"]
    state = (d / "vm.vtpm").read_bytes()
    assert (d / "vm.vtpm").stat().st_mode & 0o777 == 0o600
    assert parse_state(state).encrypted
    assert vm["report"]["shield"]["outputs"]["vtpm_state"] == str(d / "vm.vtpm")
    assert vm["report"]["shield"]["vtpm"]["kind"] == "swtpm"
    from templatetool.kp import unwrap

    doc = json.loads(unwrap((d / "vm.kp").read_bytes(), vm["owner"]))
    assert doc["version"] == 2 and doc["vtpm_key"] is None
    assert base64.b64decode(doc["vtpm_state_key"]) == sec.vtpm_state_key and len(sec.vtpm_state_key) == 32
    assert doc["vtpm_state_sha256"] == hashlib.sha256(state).hexdigest()
    assert sorted(doc["reference_boot"]) == ["11", "7"]  # the reference log's events of the sealed PCRs
    assert len(decrypt_state(state, sec.vtpm_state_key)) > 1000  # K opens the state (HMAC verified)
    assert sec.vtpm_state_key not in state and sec.vtpm_state_key.hex().encode() not in state


def test_protector_is_sealed_to_the_vtpm_srk(vm: dict[str, Any]) -> None:
    """The FVE vTPM protector's parent is the manufactured vTPM's SRK at 0x81000001 (read from swtpm)."""
    from templatetool.bitlocker import open_fve
    from templatetool.disk import open_disk, select_volume
    from templatetool.tpm.protector import parse_protector
    from templatetool.tpm.vtpm_manufacture import read_srk_name, start_vtpm

    d, sec = vm["dir"], vm["secret"]
    with open_disk(d / "vm.vhdx") as dev:
        view, _ = select_volume(dev, None)
        prots = [parse_protector(p) for p in open_fve(view).tpm_blobs()]
    with start_vtpm((d / "vm.vtpm").read_bytes(), sec.vtpm_state_key) as run:
        srk = read_srk_name(run.tcti)
    assert [(p.parent_handle, p.parent_name) for p in prots] == [(0x81000001, srk)]
    assert sec.parent_name == srk.hex() == vm["report"]["shield"]["vtpm"]["srk_name"]


def test_unlock_unseals_through_the_vtpm_and_decrypts_to_the_template(vm: dict[str, Any]) -> None:
    from templatetool.disk import open_disk, select_volume

    rep, d = vm["report"], vm["dir"]
    assert rep["ok"]
    for run in (rep["dry_run"], rep["unlock"]):
        unseal = next(s for s in run["steps"] if s["step"] == "vTPM unseal")
        assert "swtpm started" in unseal["detail"] and "the vTPM unsealed the VMK" in unseal["detail"], unseal
    dry = next(s for s in rep["dry_run"]["steps"] if s["step"] == "vTPM unseal")["detail"]
    assert "HMAC-SHA256 verified" in dry and "= the protector's parent" in dry

    def vol(p: Path) -> bytes:
        with open_disk(p) as dev:
            view, _ = select_volume(dev, 3)
            return view.read(0, view.size)

    assert vol(d / "vm-decrypted.vhdx") == vol(d / "template.vhdx")


def test_escrowed_recovery_password_opens_in_pybde(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    require_tool("qemu-img")
    import subprocess

    from templatetool.disk import open_disk, select_volume

    from .test_bitlocker_common import pybde_sha256

    d = vm["dir"]
    cp = _cli(capsys, "escrow", "open", d / "vm.recovery.p7m", "--owner", d / "owner", "--show", "--json")
    assert cp.returncode == 0, cp.stderr
    rp = json.loads(cp.stdout)["result"]["recovery_password"]
    raw = tmp_path / "vm.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(d / "vm.vhdx"), str(raw)], check=True)
    with open_disk(raw) as dev:
        view, _ = select_volume(dev, 3)
        (tmp_path / "vol").write_bytes(view.read(0, view.size))
    with open_disk(d / "vm-decrypted.vhdx") as dev:
        view, _ = select_volume(dev, 3)
        head = view.read(0, 1 << 20)
    assert pybde_sha256(tmp_path / "vol", 1 << 20, recovery_password=rp) == hashlib.sha256(head).hexdigest()


# --- refusals ----------------------------------------------------------------------------------


def _refused(cp: Any, code: int, vm: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A dry run that refused with ``code`` at the vTPM unseal: nothing after it ran, K never printed."""
    assert_clean_error(cp, code)
    steps = _steps(cp)
    assert steps["vTPM unseal"]["status"] == "failed", steps
    assert steps["BitLocker unlock"]["status"] == "skipped"
    k = vm["secret"].vtpm_state_key
    assert base64.b64encode(k).decode() not in cp.stdout + cp.stderr and k.hex() not in cp.stdout + cp.stderr
    return steps


def test_tampered_vtpm_state_refused(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    state = bytearray((vm["dir"] / "vm.vtpm").read_bytes())
    state[len(state) // 2] ^= 0x01
    disk = _vm_copy(vm, tmp_path / "t", bytes(state))
    steps = _refused(_unlock_cli(capsys, vm, disk, disk.with_suffix(".kp"), "--dry-run"), 4, vm)
    assert "SHA-256 differs from the key protector's" in steps["vTPM unseal"]["detail"]


def test_vtpm_state_of_another_vm_refused(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    disk = _vm_copy(vm, tmp_path / "t", (vm["other"] / "vm.vtpm").read_bytes())
    steps = _refused(_unlock_cli(capsys, vm, disk, disk.with_suffix(".kp"), "--dry-run"), 4, vm)
    assert "not this VM's" in steps["vTPM unseal"]["detail"]


def test_consistent_kp_for_another_vms_state_refused_by_srk_name(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    """A KP whose K and hash fit another VM's state: swtpm opens it, but its SRK is not the protector's parent."""
    from templatetool.guardian.model import load_guardian
    from templatetool.kp import unwrap
    from templatetool.pipeline.shield import VmSecret

    other_state = (vm["other"] / "vm.vtpm").read_bytes()
    other = VmSecret.from_bytes(unwrap((vm["other"] / "vm.kp").read_bytes(), load_guardian(vm["dir"] / "owner", private=True)))
    disk = _vm_copy(vm, tmp_path / "t", other_state)
    (tmp_path / "t" / "forged.kp").write_bytes(_kp_with(vm, vtpm_state_key=other.vtpm_state_key,
                                                        vtpm_state_sha256=other.vtpm_state_sha256))
    steps = _refused(_unlock_cli(capsys, vm, disk, tmp_path / "t" / "forged.kp", "--dry-run"), 4, vm)
    assert "parent Name differs" in steps["vTPM unseal"]["detail"]


def test_wrong_state_key_refused_by_swtpm(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    """K' ≠ K with the right hash: swtpm itself refuses the state (unlock), the dry run's HMAC check too."""
    from templatetool.pipeline.unlock import unlock

    disk = _vm_copy(vm, tmp_path / "t")
    kp = tmp_path / "t" / "wrongk.kp"
    kp.write_bytes(_kp_with(vm, vtpm_state_key=bytes(a ^ 0x80 for a in vm["secret"].vtpm_state_key)))
    d = vm["dir"]
    with pytest.raises(IntegrityError, match="swtpm refused the vTPM state"):
        unlock(disk, kp, d / "fabric", d / "host", output=tmp_path / "plain.vhdx")
    assert not (tmp_path / "plain.vhdx").exists()
    steps = _refused(_unlock_cli(capsys, vm, disk, kp, "--dry-run"), 4, vm)
    assert "HMAC" in steps["vTPM unseal"]["detail"]


def test_pcr_mismatch_refused_by_the_vtpm(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    """The VM booted one more PCR 7 measurement than the reference: the vTPM refuses the policy (exit 6)."""
    from templatetool.pipeline.demo import demo_tcg_log
    from templatetool.tpm.eventlog import parse_log, write_agile_log

    log = parse_log(demo_tcg_log())
    events = [(e.pcr, e.type, e.digests, e.data) for e in log.events if e.type != 0x3]
    extra = b"db update"
    events.append((7, 0x800000E0, {0x0004: hashlib.sha1(extra).digest(), 0x000B: hashlib.sha256(extra).digest()}, extra))
    (tmp_path / "boot.tcglog").write_bytes(write_agile_log(events))
    cp = _unlock_cli(capsys, vm, vm["dir"] / "vm.vhdx", vm["dir"] / "vm.kp", "--dry-run", "--tcg-log", str(tmp_path / "boot.tcglog"))
    steps = _refused(cp, 6, vm)
    assert "the TPM refused: PCR values differ" in steps["vTPM unseal"]["detail"]
    # the reference log itself unlocks (the replay is what the vTPM judged)
    (tmp_path / "ref.tcglog").write_bytes(demo_tcg_log())
    ok = _unlock_cli(capsys, vm, vm["dir"] / "vm.vhdx", vm["dir"] / "vm.kp", "--dry-run", "--tcg-log", str(tmp_path / "ref.tcglog"))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_claimed_pcr_values_checked_against_the_policy(vm: dict[str, Any]) -> None:
    from templatetool.pipeline.unlock import unlock

    d = vm["dir"]
    rep = unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", d / "host", dry_run=True,
                 pcr_values={7: b"\x01" * 32, 11: b"\x02" * 32})
    assert rep.exit_code == PolicyError.exit_code and "do not satisfy the sealed policy" in rep.steps[3].detail


def test_kp_without_this_guardian_releases_nothing(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    from templatetool.guardian.model import generate_guardian, save_guardian
    from templatetool.hgs import AttestationPolicy, init_attestation, new_host
    from templatetool.hgs.host import pem_public

    other = tmp_path / "other-hgs"
    save_guardian(generate_guardian("Other HGS", "ec-p256"), other, None)
    init_attestation(other)
    pol = AttestationPolicy.load(other)
    h = new_host("h2", tmp_path / "h2")
    pol.add_host_key("h2", pem_public(h.host_key.public_key()))
    pol.save(other)
    d = vm["dir"]
    cp = _cli(capsys, "unlock", d / "vm.vhdx", "--kp", d / "vm.kp", "--guardian", other, "--host", tmp_path / "h2",
              "--dry-run", "--json")
    assert_clean_error(cp, 5)
    steps = _steps(cp)
    assert steps["attestation"]["status"] == "passed" and steps["key release"]["status"] == "failed"
    assert "has no wrapping" in steps["key release"]["detail"]
    assert steps["vTPM unseal"]["status"] == "skipped"


def test_missing_vtpm_state_is_not_found(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    disk = _vm_copy(vm, tmp_path / "t")
    (tmp_path / "t" / "vm.vtpm").unlink()
    steps = _refused(_unlock_cli(capsys, vm, disk, disk.with_suffix(".kp"), "--dry-run"), 9, vm)
    assert "vTPM state is missing" in steps["vTPM unseal"]["detail"]


# --- the VM secret -----------------------------------------------------------------------------


def test_vm_secret_v1_still_parses_and_v2_round_trips(vm: dict[str, Any]) -> None:
    from templatetool.pipeline.shield import VmSecret

    v1 = json.dumps({"format": "templatetool-vm-secret", "version": 1, "vtpm_key": None, "parent_name": "000b" + "00" * 32,
                     "bank": "sha256", "pcrs": [7], "policy": "shielded", "pcr_values": {"7": "00" * 32}}).encode()
    s1 = VmSecret.from_bytes(v1)
    assert s1.version == 1 and not s1.has_vtpm_state and s1.pcr_values == {7: "00" * 32}
    assert VmSecret.from_bytes(s1.to_bytes()) == s1
    s2 = vm["secret"]
    assert s2.version == 2 and VmSecret.from_bytes(s2.to_bytes()) == s2
    assert "vtpm_state_key" not in repr(s2) and base64.b64encode(s2.vtpm_state_key).decode() not in repr(s2)


@pytest.mark.parametrize("change", [{"vtpm_state_key": base64.b64encode(bytes(31)).decode()},
                                    {"vtpm_state_sha256": "00" * 31}, {"vtpm_state_sha256": None},
                                    {"version": 3}, {"version": True}, {"reference_boot": {"7": ["zz"]}}])
def test_malformed_vm_secret_is_a_format_error(vm: dict[str, Any], change: dict[str, Any]) -> None:
    from templatetool.pipeline.shield import VmSecret

    doc = json.loads(vm["secret"].to_bytes())
    doc.update(change)
    with pytest.raises(FormatError, match="not a templatetool VM secret"):
        VmSecret.from_bytes(json.dumps(doc).encode())


# --- the other vTPM modes, and no swtpm ----------------------------------------------------------


def test_software_vtpm_mode_still_works(vm: dict[str, Any], tmp_path: Path) -> None:
    from templatetool.guardian.model import load_guardian
    from templatetool.pipeline.shield import shield
    from templatetool.pipeline.unlock import unlock

    d = vm["dir"]
    rep = shield(d / "template.vhdx", d / "tenant.pdk", tmp_path / "vm.vhdx", vm["owner"], vtpm="software",
                 pcr_values={7: bytes(32), 11: bytes(32)}, guardians=[load_guardian(d / "fabric")], verify_content=False)
    assert rep["vtpm"]["kind"] == "software" and "vtpm_state" not in rep["outputs"]
    assert not (tmp_path / "vm.vtpm").exists()
    dry = unlock(tmp_path / "vm.vhdx", tmp_path / "vm.kp", d / "fabric", d / "host", dry_run=True)
    assert dry.ok and "in software" in dry.steps[3].detail, dry.to_json()


def test_shield_without_swtpm_is_a_resource_error(vm: dict[str, Any], tmp_path: Path) -> None:
    """No swtpm on PATH: shield stops before any work, naming the package and --vtpm software."""
    d = vm["dir"]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    py = Path(sys.executable)
    (bindir / "python").symlink_to(py)
    args = ("shield", str(d / "template.vhdx"), "--pdk", str(d / "tenant.pdk"), "--owner", str(d / "owner"),
            "--guardian", str(d / "fabric"), "-o", str(tmp_path / "vm.vhdx"), "--pcr-values",
            f"7={'00' * 32},11={'00' * 32}")
    cp = run_cli(*args, env={"PATH": str(bindir)})
    assert_clean_error(cp, ResourceError.exit_code)
    assert "swtpm" in cp.stderr and "--vtpm software" in cp.stderr, cp.stderr
    assert not list(tmp_path.glob("vm*")) and not list(tmp_path.glob(".vm*"))
    with pytest.raises(ResourceError, match="swtpm"):
        from templatetool.pipeline.shield import check_vtpm_mode

        old = os.environ["PATH"]
        os.environ["PATH"] = str(bindir)
        try:
            check_vtpm_mode("swtpm", None)
        finally:
            os.environ["PATH"] = old
    assert shutil.which("swtpm")  # restored


def test_shield_refuses_an_existing_vtpm_state_without_overwrite(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    d = vm["dir"]
    (tmp_path / "vm.vtpm").write_bytes(b"someone's state")
    cp = _cli(capsys, "shield", d / "template.vhdx", "--pdk", d / "tenant.pdk", "--owner", d / "owner",
              "--guardian", d / "fabric", "-o", tmp_path / "vm.vhdx", "--pcr-values", f"7={'00' * 32},11={'00' * 32}")
    assert_clean_error(cp, 2)
    assert "vm.vtpm" in cp.stderr, cp.stderr
    assert (tmp_path / "vm.vtpm").read_bytes() == b"someone's state" and not (tmp_path / "vm.vhdx").exists()


def test_shield_in_place_writes_the_vtpm_state_before_converting(vm: dict[str, Any], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--in-place: VM.vtpm is written with the KP and escrow (before any sector changes); the VM unlocks."""
    from templatetool.guardian.model import load_guardian
    from templatetool.pipeline.shield import shield
    from templatetool.pipeline.unlock import unlock

    d = vm["dir"]
    disk = tmp_path / "big.vhdx"
    shutil.copy(d / "template.vhdx", disk)
    seen: list[bool] = []
    import templatetool.bitlocker.inplace as ip

    real = ip.in_place

    def spy(*a: Any, **k: Any) -> Any:
        on_keys = k.get("on_keys")

        def keys(res: Any) -> None:
            assert on_keys is not None
            on_keys(res)
            seen.append((tmp_path / "big.vtpm").is_file() and (tmp_path / "big.kp").is_file())
        return real(*a, **{**k, "on_keys": keys})

    monkeypatch.setattr(ip, "in_place", spy)
    rep = shield(disk, d / "tenant.pdk", disk, vm["owner"], in_place=True, pcr_values={7: bytes(32), 11: bytes(32)},
                 guardians=[load_guardian(d / "fabric")])
    monkeypatch.undo()
    assert seen == [True]
    assert rep["outputs"]["vtpm_state"] == str(tmp_path / "big.vtpm") and rep["vtpm"]["kind"] == "swtpm"
    dry = unlock(disk, tmp_path / "big.kp", d / "fabric", d / "host", dry_run=True)
    assert dry.ok and "swtpm started" in dry.steps[3].detail, dry.to_json()


def test_shield_in_place_used_space_only(capsys: pytest.CaptureFixture[str], vm: dict[str, Any], tmp_path: Path) -> None:
    """shield --in-place --used-space-only: the template's free, unallocated blocks stay
    unallocated (the VHDX grows by far less than a full conversion), qemu-img check is clean, and
    the guardian's unlock decrypts the disk and verifies it against the signed catalog."""
    require_tool("qemu-img")
    import subprocess

    d = vm["dir"]
    sizes = {}
    for name, extra in (("uso", ["--used-space-only"]), ("full", [])):
        disk = tmp_path / f"{name}.vhdx"
        shutil.copy(d / "template.vhdx", disk)
        before = disk.stat().st_size
        cp = _cli(capsys, "shield", disk, "--pdk", d / "tenant.pdk", "--owner", d / "owner", "--guardian", d / "fabric",
                  "--in-place", *extra, "--pcr-values", f"7={'00' * 32},11={'00' * 32}", "--json")
        assert cp.returncode == 0, cp.stderr
        rep = json.loads(cp.stdout)["result"]
        sizes[name] = (disk.stat().st_size - before, rep["bitlocker"]["skipped_bytes"])
        assert subprocess.run(["qemu-img", "check", "-f", "vhdx", str(disk)], capture_output=True).returncode == 0
    (grown, skipped), (grown_full, skipped_full) = sizes["uso"], sizes["full"]
    assert skipped > 0 and skipped_full == 0, sizes
    assert grown_full >= grown + skipped // 2, sizes
    out = tmp_path / "plain.vhdx"
    cp = _unlock_cli(capsys, vm, tmp_path / "uso.vhdx", tmp_path / "uso.kp", "-o", out)
    assert cp.returncode == 0, cp.stderr
    steps = {s["step"]: s["status"] for s in json.loads(cp.stdout)["result"]["steps"]}
    assert steps["decrypt"] == steps["catalog verify"] == "passed", steps
    cp = _cli(capsys, "shield", d / "template.vhdx", "--pdk", d / "tenant.pdk", "--owner", d / "owner",
              "--guardian", d / "fabric", "-o", tmp_path / "x.vhdx", "--used-space-only",
              "--pcr-values", f"7={'00' * 32},11={'00' * 32}")
    assert_clean_error(cp, 2)
    assert "--used-space-only" in cp.stderr and not (tmp_path / "x.vhdx").exists()
