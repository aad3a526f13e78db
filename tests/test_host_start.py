"""`host start`: a VM boots OVMF under QEMU with its own vTPM (swtpm on the released, encrypted
state). The guest proves the vTPM was measured into: a UEFI shell script on the VM's disk sends
TPM2_PCR_Read through the TPM's CRB registers and dumps the answer on the serial port."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from templatetool.errors import IntegrityError, PolicyError
from templatetool.host.launch import VmConfig, build_qemu_argv, kvm_usable, run_vm

from .conftest import require_module, require_tool

CRB = 0xFED40000


def _pcr_read_cmd() -> bytes:
    """TPM2_PCR_Read(sha256: PCR 0), no sessions."""
    cmd = struct.pack(">HIIIHB3s", 0x8001, 20, 0x17E, 1, 0x000B, 3, b"\x01\x00\x00")
    assert len(cmd) == 20
    return cmd


def startup_nsh() -> bytes:
    """UEFI shell script: request locality 0, cmdReady, write TPM2_PCR_Read into the CRB buffer
    (little-endian dwords), start it, dump the response, power off."""
    cmd = _pcr_read_cmd()
    lines = [f"mm {CRB + 0x08:X} 1 -w 4 -MMIO -n", f"mm {CRB + 0x40:X} 1 -w 4 -MMIO -n"]
    for i in range(0, len(cmd), 4):
        (dw,) = struct.unpack("<I", cmd[i:i + 4])
        lines.append(f"mm {CRB + 0x80 + i:X} {dw:08X} -w 4 -MMIO -n")
    lines += [f"mm {CRB + 0x4C:X} 1 -w 4 -MMIO -n", "stall 300000", "echo TT-PCR-BEGIN",
              f"dmem {CRB + 0x80:X} 40", "echo TT-PCR-END", "reset -s"]
    return ("\r\n".join(lines) + "\r\n").encode()


def make_esp_vhdx(tmp: Path) -> Path:
    """A VHDX holding a FAT file system with the startup.nsh (OVMF's shell runs it from FS0:)."""
    require_tool("mkfs.fat", "mcopy", "qemu-img")
    raw = tmp / "esp.img"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.fat", str(raw)], check=True, capture_output=True)
    nsh = tmp / "startup.nsh"
    nsh.write_bytes(startup_nsh())
    subprocess.run(["mcopy", "-i", str(raw), str(nsh), "::/startup.nsh"], check=True, capture_output=True)
    vhdx = tmp / "VM.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", str(raw), str(vhdx)], check=True,
                   capture_output=True)
    raw.unlink()
    return vhdx


def guest_pcr0(serial: bytes) -> bytes:
    """PCR 0 as the guest read it: parse the dmem hex dump of the TPM2_PCR_Read response."""
    text = re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", serial).decode(errors="replace")
    block = text.split("TT-PCR-BEGIN")[-1].split("TT-PCR-END")[0]
    hexbytes = "".join("".join(m.group(1).replace("-", " ").split())
                       for m in re.finditer(r"FED400[0-9A-F]{2}: ((?:[0-9A-F]{2}[ -]){15}[0-9A-F]{2})", block))
    resp = bytes.fromhex(hexbytes)
    tag, _size, rc = struct.unpack(">HII", resp[:10])
    assert (tag, rc) == (0x8001, 0), (hex(tag), hex(rc), resp[:16].hex())
    # updateCounter u32, TPML_PCR_SELECTION (count 1, sha256, sizeofSelect 3, 01 00 00), TPML_DIGEST count 1
    off = 10 + 4 + 4 + 2 + 1 + 3
    count, dsize = struct.unpack(">IH", resp[off:off + 6])
    assert count == 1 and dsize == 32
    return resp[off + 6:off + 6 + 32]


@pytest.fixture(scope="module")
def vtpm():
    require_tool("swtpm", "swtpm_setup")
    from templatetool.tpm.vtpm_manufacture import manufacture_vtpm

    return manufacture_vtpm()


def _cfg(tmp: Path, **kw) -> VmConfig:
    disk = tmp / "VM.vhdx"
    if not disk.exists():
        disk.write_bytes(b"\0" * 4096)
    return VmConfig(disk, **kw)


# -- fast: policy, command line, refusals before anything runs ----------------------------------

def test_shielded_policy_allows_no_console(tmp_path: Path) -> None:
    for console in ("serial", "vnc"):
        with pytest.raises(PolicyError, match="shielded"):
            _cfg(tmp_path, policy="shielded", console=console).check()
    _cfg(tmp_path, policy="encryption-supported", console="serial").check()
    with pytest.raises(PolicyError):
        _cfg(tmp_path, policy="open-door").check()


def test_qemu_argv_shielded_vs_encryption_supported(tmp_path: Path) -> None:
    kw = {"code": Path("/fw/CODE.fd"), "vars_copy": tmp_path / "VARS.fd", "tpm_socket": tmp_path / "s.sock"}
    a = build_qemu_argv(_cfg(tmp_path, policy="shielded", serial_log=tmp_path / "serial.log"), accel="tcg", **kw)
    s = " ".join(a)
    assert "-display none" in s and "-monitor none" in s and "-nodefaults" in s and "VGA" not in s
    assert f"-serial file:{tmp_path / 'serial.log'}" in s and "stdio" not in s
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd" in s
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'VARS.fd'}" in s and "readonly" not in s.split("unit=1")[1]
    assert f"socket,id=chrtpm,path={tmp_path / 's.sock'}" in s
    assert "-tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0" in s
    assert "format=vhdx" in s and "-accel tcg" in s
    b = " ".join(build_qemu_argv(_cfg(tmp_path, policy="encryption-supported", console="serial"), accel="kvm", **kw))
    assert "-serial stdio" in b and "-accel kvm" in b and "-monitor none" in b
    c = " ".join(build_qemu_argv(_cfg(tmp_path, policy="encryption-supported", console="vnc"), accel="tcg", **kw))
    assert "-device VGA -display vnc=127.0.0.1:0" in c


def test_kvm_probe_is_a_guest_run(tmp_path: Path) -> None:
    assert kvm_usable(str(tmp_path / "no-kvm")) is False
    (tmp_path / "not-kvm").write_bytes(b"")
    assert kvm_usable(str(tmp_path / "not-kvm")) is False
    assert isinstance(kvm_usable(), bool)


def test_wrong_key_or_altered_state_refused_before_swtpm(vtpm, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, policy="shielded")
    with pytest.raises(IntegrityError):
        run_vm(cfg, vtpm.state, bytes(32))
    bad = bytearray(vtpm.state)
    bad[-40] ^= 1
    with pytest.raises(IntegrityError):
        run_vm(cfg, bytes(bad), vtpm.key)


def test_swtpm_itself_refuses_a_wrong_key(vtpm) -> None:
    """Independent of our HMAC pre-check: swtpm does not start on the state with another key."""
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    with pytest.raises(IntegrityError), start_vtpm(vtpm.state, bytes(range(32))):
        pass


# -- slow: the real boot ---------------------------------------------------------------------

def _read_clock_and_pcr0(state: bytes, key: bytes) -> tuple[int, bytes]:
    require_module("tpm2_pytss")
    import tpm2_pytss as t

    from templatetool.tpm.vtpm_manufacture import start_vtpm

    with start_vtpm(state, key) as sw:
        esys = t.ESAPI(sw.swtpm.tcti_loader())
        try:
            info = esys.read_clock()
            _cnt, _sel, vals = esys.pcr_read(t.TPML_PCR_SELECTION.parse("sha256:0"))
            return int(info.clockInfo.resetCount), bytes(vals[0])
        finally:
            esys.close()


def test_ovmf_boots_with_the_released_vtpm(vtpm, tmp_path: Path) -> None:
    """Key release over a live HGS gives K; swtpm runs on the state with it; OVMF boots under QEMU
    (TCG here), measures into the vTPM (the guest reads PCR 0 != 0 through the CRB) and the state
    swtpm leaves verifies with K only, carrying the boot's TPM Reset (resetCount + 1)."""
    require_tool("qemu-system-x86_64", "swtpm")
    require_module("httpx")
    require_module("uvicorn")
    import os
    import time

    from templatetool.guardian.model import generate_guardian, load_guardian
    from templatetool.hgs import AttestationPolicy, new_host
    from templatetool.hgs.host import pem_public
    from templatetool.hgs.service import create_app, load_service_state
    from templatetool.host.health import attest_host, release_secret
    from templatetool.kp import create_kp

    from .test_hgs_service import LiveServer, _fabric

    gdir = _fabric(tmp_path)
    host = new_host("host-01", tmp_path / "host", key="ec-p256")
    pol = AttestationPolicy.load(gdir)
    pol.add_host_key("host-01", pem_public(host.host_key.public_key()))
    pol.save(gdir)
    kp = create_kp(vtpm.key, generate_guardian("Owner", "ec-p256"), [load_guardian(gdir)])
    state = load_service_state(gdir, f"sqlite:///{tmp_path / 'state.sqlite'}")
    srv = LiveServer(create_app(state))
    try:
        health = attest_host(srv.url, tmp_path / "host")
        key = release_secret(srv.url, tmp_path / "host", kp, health)
    finally:
        srv.stop()
        state.store.close()
    assert key == vtpm.key
    disk = make_esp_vhdx(tmp_path)
    serial = tmp_path / "serial.log"
    cfg = VmConfig(disk, policy="shielded", serial_log=serial, memory_mib=256, cpus=1, no_reboot=True, timeout=240)
    t0 = time.monotonic()
    run = run_vm(cfg, vtpm.state, key)
    print(f"\nboot: {run.seconds:.1f} s under {run.accel} (kvm fallback {run.kvm_fallback}); "
          f"total with swtpm {time.monotonic() - t0:.1f} s; load {os.getloadavg()[0]:.1f}")
    assert run.exit_code == 0
    pcr0 = guest_pcr0(serial.read_bytes())
    assert pcr0 != bytes(32) and pcr0 != b"\xff" * 32
    # the state swtpm left: still encrypted under K (another key is refused), and it went through the boot
    with pytest.raises(IntegrityError):
        run_vm(cfg, run.final_state, bytes(32))
    before, _ = _read_clock_and_pcr0(vtpm.state, vtpm.key)
    after, pcr0_restarted = _read_clock_and_pcr0(run.final_state, vtpm.key)
    assert after == before + 1  # the firmware's TPM2_Startup(CLEAR) is in the saved state
    # PCRs are volatile: OVMF ends with TPM2_Shutdown(CLEAR), so a restarted TPM starts from zero
    assert pcr0_restarted == bytes(32)


# -- fast: the launcher's process handling, with a stand-in for QEMU -----------------------------

FAKE_QEMU = """#!/bin/sh
# stand-in for qemu-system-x86_64: KVM "fails" like on a nested host, TCG runs and exits 0
case "$*" in
  *"-accel kvm"*) echo "KVM internal error. Suberror: 1" >&2; sleep 30 ;;
esac
case "$*" in
  *"tpm-crb,tpmdev=tpm0"*) ;;
  *) exit 3 ;;
esac
[ -n "$FAKE_QEMU_FAIL" ] && { echo "qemu-system-x86_64: -drive: Could not open disk" >&2; exit 1; }
exit 0
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> str:
    p = tmp_path / "fake-qemu"
    p.write_text(FAKE_QEMU)
    p.chmod(0o755)
    return str(p)


def test_kvm_failure_falls_back_to_tcg(vtpm, tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import templatetool.host.launch as launch

    monkeypatch.setattr(launch, "kvm_usable", lambda dev="/dev/kvm": True)
    cfg = _cfg(tmp_path, policy="shielded", qemu=fake_qemu, timeout=60)
    run = run_vm(cfg, vtpm.state, vtpm.key)
    assert (run.accel, run.kvm_fallback, run.exit_code) == ("tcg", True, 0)
    assert run.final_state == vtpm.state  # swtpm ran on the state; nothing used the TPM
    assert vtpm.key.hex() not in " ".join(run.argv)


def test_qemu_failure_is_one_clean_error(vtpm, tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from templatetool.errors import ResourceError

    monkeypatch.setenv("FAKE_QEMU_FAIL", "1")
    cfg = _cfg(tmp_path, policy="shielded", qemu=fake_qemu, accel="tcg", timeout=60)
    with pytest.raises(ResourceError, match="Could not open disk"):
        run_vm(cfg, vtpm.state, vtpm.key)
