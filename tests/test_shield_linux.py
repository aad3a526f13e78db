"""`shield` of a Linux template (pipeline/shield_linux.py), judged without booting: cryptsetup reads
the new LUKS2 header and its keyslots (the template's passphrase no longer opens it, the escrowed
recovery key does), the decrypted root equals the golden filesystem, and systemd 252's own token
plugin unseals the key inside the VM's vTPM (swtpm on VM.vtpm with the K the KP carries) — and
refuses after one more PCR 7 extend. The booted proof is tests/test_fabric_e2e.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import assert_clean_error, require_module, require_tool, run_cli
from .test_catalog import make_pfx_signer
from .test_protect_linux import ROOT, make_linux_disk

PW = {"TPL_PW": "template keyslot passphrase", "OWNER_PW": "owner pass"}
EVENT = b"the VM's firmware, as the reference boot measured it"
#: PCR 7 after one extend of sha256(EVENT) from zero: the value the token is sealed to here.
PCR7 = hashlib.sha256(bytes(32) + hashlib.sha256(EVENT).digest()).digest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cp = run_cli(*args, env=PW)
    assert cp.returncode == 0, f"{args[:2]}: {cp.stderr}"
    return cp


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tool("swtpm", "swtpm_setup", "cryptsetup", "qemu-img", "sgdisk", "mkfs.ext4")
    require_module("tpm2_pytss")
    d = tmp_path_factory.mktemp("shield-linux")
    golden, fs = make_linux_disk(d)
    signer = make_pfx_signer(d)
    _cli("protect", str(golden), "--os", "linux", "-o", str(d / "t.vhdx"), "--name", "LinuxT", "--version", "1.0.0.0",
         "--signer", signer.path, "--luks-passphrase-env", "TPL_PW")
    _cli("vsc", "export", str(d / "t.vhdx"), "-o", str(d / "t.vsc"))
    _cli("guardian", "new", "Owner", "-o", str(d / "owner"), "--password-env", "OWNER_PW")
    _cli("guardian", "new", "Fabric", "-o", str(d / "fab"), "--no-password")
    _cli("pdk", "new", "-o", str(d / "t.pdk"), "--owner", str(d / "owner"), "--password-env", "OWNER_PW",
         "--guardian", str(d / "fab"), "--vsc", str(d / "t.vsc"), "--version-rule", "ge", "--policy", "shielded",
         "--allow-untrusted-root")
    return {"d": d, "golden": golden, "fs": fs, "template": d / "t.vhdx"}


def _shield_args(w: dict[str, Any], out: Path, template: Path | None = None) -> list[str]:
    return ["shield", str(template or w["template"]), "--pdk", str(w["d"] / "t.pdk"), "--owner", str(w["d"] / "owner"),
            "--owner-password-env", "OWNER_PW", "--guardian", str(w["d"] / "fab"), "-o", str(out),
            "--pcrs", "7", "--pcr-values", f"7={PCR7.hex()}", "--template-passphrase-env", "TPL_PW"]


def _root_partition(vhdx: Path, tmp: Path) -> Path:
    raw = tmp / (vhdx.stem + ".raw")
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(raw)], check=True)
    out = tmp / (vhdx.stem + ".root.luks")
    with open(raw, "rb") as f:
        f.seek(ROOT[0])
        out.write_bytes(f.read(ROOT[1]))
    raw.unlink()
    return out


def _opens(luks: Path, passphrase: bytes) -> bool:
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(luks)], input=passphrase,
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def shielded(world: dict[str, Any]) -> dict[str, Any]:
    vm = world["d"] / "vm" / "VM.vhdx"
    vm.parent.mkdir()
    cp = _cli(*_shield_args(world, vm), "--json")
    rep = json.loads(cp.stdout)["result"]
    secret_path = world["d"] / "vm" / "secret.json"
    _cli("kp", "unwrap", str(vm.with_suffix(".kp")), "--guardian", str(world["d"] / "owner"), "--password-env",
         "OWNER_PW", "-o", str(secret_path))
    cp = _cli("escrow", "open", str(vm.with_suffix(".recovery.p7m")), "--owner", str(world["d"] / "owner"),
              "--owner-password-env", "OWNER_PW", "--show", "--json")
    return {"vm": vm, "report": rep, "secret": json.loads(secret_path.read_bytes()),
            "recovery": json.loads(cp.stdout)["result"]["recovery_password"],
            "root": _root_partition(vm, world["d"] / "vm"), "template_root": _root_partition(world["template"], world["d"])}


def test_root_rekeyed_with_recovery_key_and_token(world: dict[str, Any], shielded: dict[str, Any]) -> None:
    from templatetool.luks import decrypt_image

    rep, root = shielded["report"], shielded["root"]
    assert rep["os"] == "linux" and rep["catalog_verified"] is True and rep["policy"] == "shielded"
    dump = subprocess.run(["cryptsetup", "luksDump", str(root)], capture_output=True, text=True, check=True).stdout
    assert "systemd-tpm2" in dump and "sector: 512" in dump  # 1 KiB-block ext4 inside: 512-byte sectors
    # the template author's passphrase opens the template, not the VM: the volume key is new
    assert _opens(shielded["template_root"], PW["TPL_PW"].encode())
    assert not _opens(root, PW["TPL_PW"].encode())
    rk = shielded["recovery"]
    assert len(rk) == 71 and rk.count("-") == 7 and set(rk.replace("-", "")) <= set("cbdefghijklnrtuv")
    assert _opens(root, rk.encode())
    plain = world["d"] / "vm" / "root.plain"
    decrypt_image(root, plain, rk.encode())
    assert plain.read_bytes()[: len(world["fs"])] == world["fs"]
    # same plaintext, other ciphertext: the whole data segment was re-encrypted
    t_data, v_data = shielded["template_root"].read_bytes()[16 << 20:], root.read_bytes()[16 << 20:]
    assert len(t_data) == len(v_data)
    same = sum(1 for i in range(0, len(t_data), 4096) if t_data[i:i + 16] == v_data[i:i + 16])
    assert same == 0
    r = subprocess.run(["e2fsck", "-n", "-f", str(plain)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stock_plugin_unseals_in_the_vms_vtpm(shielded: dict[str, Any]) -> None:
    """K from the KP starts swtpm on VM.vtpm; at the sealed PCR 7 the systemd-tpm2 plugin opens a
    keyslot; one more PCR 7 extend and it refuses."""
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    from .test_luks_tpm2 import PLUGIN, _extend, stock_plugin_unlocks

    if not PLUGIN.exists():
        pytest.skip("needs systemd's cryptsetup token plugin")
    require_tool("tpm2_flushcontext")
    sec = shielded["secret"]
    state = shielded["vm"].with_suffix(".vtpm").read_bytes()
    assert hashlib.sha256(state).hexdigest() == sec["vtpm_state_sha256"] and sec["pcrs"] == [7]
    assert sec["pcr_values"] == {"7": PCR7.hex()}
    with start_vtpm(state, base64.b64decode(sec["vtpm_state_key"])) as sw:
        assert stock_plugin_unlocks(shielded["root"], sw.tcti) < 0  # PCR 7 still zero: not the sealed value
        _extend(sw.tcti, 7, EVENT)
        assert stock_plugin_unlocks(shielded["root"], sw.tcti) == 1  # keyslot 1: the token's
        _extend(sw.tcti, 7, b"one more boot component")
        assert stock_plugin_unlocks(shielded["root"], sw.tcti) < 0
    # another vTPM (a fresh one at the same PCR 7) cannot unseal it: the secret lives in this one
    from templatetool.tpm.vtpm_manufacture import manufacture_vtpm

    other = manufacture_vtpm()
    with start_vtpm(other.state, other.key) as sw:
        _extend(sw.tcti, 7, EVENT)
        assert stock_plugin_unlocks(shielded["root"], sw.tcti) < 0


def test_refusals_leave_no_outputs(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "VM.vhdx"
    # the wrong template passphrase: a credential error, exit 5
    cp = run_cli(*_shield_args(world, out), env={**PW, "TPL_PW": "not it"})
    assert_clean_error(cp, 5)
    # no passphrase and no terminal: a usage error naming the option
    args = _shield_args(world, out)
    cp = run_cli(*args[: args.index("--template-passphrase-env")], env=PW)
    assert_clean_error(cp, 2)
    # one byte of the boot chain (the ESP) changed after protect: the catalog catches it, exit 6
    bad = tmp_path / "bad.vhdx"
    raw = tmp_path / "bad.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(world["template"]), str(raw)], check=True)
    with open(raw, "r+b") as f:  # a byte of the fake UKI (mcopy put it early in the FAT data area)
        f.seek((1 << 20) + 4 * (1 << 20))
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", str(raw), str(bad)], check=True)
    from templatetool.catalog import VSC_METADATA_GUID
    from templatetool.vhdx import open_vhdx

    disk = open_vhdx(bad, writable=True)  # carry the template's signed catalog over
    try:
        disk.set_user_metadata(VSC_METADATA_GUID, (world["d"] / "t.vsc").read_bytes(), virtual_disk=True)
    finally:
        disk.close()
    cp = run_cli(*_shield_args(world, out, bad), env=PW)
    assert_clean_error(cp, 6)
    assert "ESP" in cp.stderr or "catalog" in cp.stderr
    # in place is not offered for Linux templates
    cp = run_cli("shield", str(world["template"]), "--pdk", str(world["d"] / "t.pdk"), "--owner",
                 str(world["d"] / "owner"), "--owner-password-env", "OWNER_PW", "--in-place", "--pcrs", "7",
                 "--pcr-values", f"7={PCR7.hex()}", env=PW)
    assert_clean_error(cp, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.raw", "bad.vhdx"]


def test_api_shield_linux_with_a_passphrase_value(world: dict[str, Any], tmp_path: Path) -> None:
    """The library takes the template passphrase as a value (or a SecretSource, called once)."""
    from templatetool import api

    calls = []

    def source() -> str:
        calls.append(1)
        return PW["TPL_PW"]

    res = api.shield(world["template"], world["d"] / "t.pdk", tmp_path / "VM.vhdx", owner=world["d"] / "owner",
                     owner_password=PW["OWNER_PW"], guardians=[world["d"] / "fab"], pcrs=[7],
                     pcr_values={7: PCR7}, template_passphrase=source)
    assert calls == [1] and res.vtpm_state and Path(res.vtpm_state).exists() and Path(res.kp).exists()
    assert res.report["os"] == "linux"


def test_unlock_and_dry_run_of_a_linux_vm(world: dict[str, Any], shielded: dict[str, Any], tmp_path: Path) -> None:
    """The guardian side offline: attest, release, host opens it, the VM's vTPM (boot played in)
    unseals the token, the LUKS2 keyslot opens; unlock writes the root's plaintext (= the golden
    filesystem); a different boot fails at the vTPM unseal."""
    from templatetool.tpm.eventlog import write_agile_log

    d = world["d"]
    if not (d / "fab" / "attestation.json").exists():
        _cli("hgs", "init", str(d / "fab"))
        _cli("host", "new", "host-01", "-o", str(d / "host"))
        _cli("hgs", "register-host", str(d / "fab"), "--host", str(d / "host"), "--name", "host-01")

    def log(*events: bytes) -> Path:
        p = tmp_path / f"boot{len(events)}.log"
        p.write_bytes(write_agile_log([(7, 0x80000001, {0x000B: hashlib.sha256(e).digest()}, e) for e in events]))
        return p

    vm = shielded["vm"]
    base = ["unlock", str(vm), "--kp", str(vm.with_suffix(".kp")), "--guardian", str(d / "fab"), "--host",
            str(d / "host")]
    cp = run_cli(*base, "--dry-run", "--tcg-log", str(log(EVENT)), "--json", env=PW)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    steps = {s["step"]: s for s in json.loads(cp.stdout)["result"]["steps"]}
    assert [n for n, s in steps.items() if s["status"] == "passed"] == [
        "attestation", "key release", "host receives key", "vTPM unseal", "LUKS2 unlock", "catalog verify"]
    assert "systemd-tpm2" in steps["vTPM unseal"]["detail"] and "HMAC" in steps["vTPM unseal"]["detail"]
    assert steps["decrypt"]["status"] == "skipped"
    # one more boot event: the vTPM refuses, nothing after it runs
    cp = run_cli(*base, "--dry-run", "--tcg-log", str(log(EVENT, b"one more")), "--json", env=PW)
    assert cp.returncode != 0
    steps = {s["step"]: s for s in json.loads(cp.stdout)["result"]["steps"]}
    assert steps["vTPM unseal"]["status"] == "failed" and steps["LUKS2 unlock"]["status"] == "skipped"
    # PCR values claimed for the boot must satisfy the token's policy
    cp = run_cli(*base, "--dry-run", "--pcr-values", "7=" + "00" * 32, "--json", env=PW)
    assert cp.returncode == 6
    # the real unlock: the plaintext root, equal to the golden filesystem
    out = tmp_path / "root.img"
    cp = run_cli(*base, "--tcg-log", str(log(EVENT)), "-o", str(out), env=PW)
    assert cp.returncode == 0, cp.stderr
    assert out.read_bytes()[: len(world["fs"])] == world["fs"] and (out.stat().st_mode & 0o777) == 0o600
