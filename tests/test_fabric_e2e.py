"""The proof of issue 16, end to end through the CLI: a small Linux guest built from Debian packages
is protected (LUKS2 root, ESP measured into a signed VSC), a tenant makes a PDK for the fabric,
shield re-keys the root and seals it in the VM's own vTPM (systemd-tpm2 token), an `hgs serve`
node runs, a host whose TPM (swtpm standing in for hardware) is registered by its EK attests with
a TPM quote, and `host start` boots the VM under QEMU + OVMF: the guest's stock systemd token plugin
unlocks the root through the vTPM and prints the marker on the serial console.

Negative cases, each its own test, each refused with the disk still sealed (no marker, VM.vhdx
unchanged): host not registered, PCR baseline mismatch, KP without this fabric as guardian,
tampered vTPM state, one more PCR 7 extend inside the guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, assert_clean_error, require_module, require_tool, run_cli

require_module("httpx")
require_module("uvicorn")
require_module("sqlalchemy")
require_module("tpm2_pytss")

GUEST_TOOLS = ("qemu-system-x86_64", "swtpm", "swtpm_setup", "mkfs.ext4", "mkfs.fat", "cryptsetup")
MARKER = "shielded-linux-e2e-7f3a"
PW = {"AUTHOR_PW": "author signing pass", "OWNER_PW": "owner pass", "HGS_PW": "fabric pass",
      "TPL_PW": "template keyslot pass", "RECOVERY_UNUSED": "x"}
#: The host's measured boot (what its TPM was extended with) and the fabric's baseline of it.
HOST_EVENTS = [(0, b"host firmware 1.0"), (4, b"host boot manager"), (7, b"host secure boot on")]
BOOT_TIMEOUT = "300"


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    cp = run_cli(*args, env=PW)
    if ok:
        assert cp.returncode == 0, f"{' '.join(args[:3])}: {cp.stderr}"
    return cp


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _host_log() -> bytes:
    from templatetool.tpm.eventlog import write_agile_log

    return write_agile_log([(pcr, 0x80000001, {0x000B: hashlib.sha256(d).digest()}, d) for pcr, d in HOST_EVENTS])


def _extend_host(tcti: str, events: list[tuple[int, bytes]]) -> None:
    import tpm2_pytss as t

    from templatetool.tpm.tpmclient import open_tpm

    esys = open_tpm(tcti)
    try:
        for pcr, d in events:
            ha = t.TPMT_HA(hashAlg=0x000B)
            ha.digest.sha256 = hashlib.sha256(d).digest()
            esys.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), t.TPML_DIGEST_VALUES([ha]))
    finally:
        esys.close()


def _start_node(gdir: Path, db: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, **PW)
    p = subprocess.Popen([sys.executable, "-m", "templatetool.cli.main", "hgs", "serve", str(gdir), "--port", "0",
                          "--db", db, "--password-env", "HGS_PW"], cwd=str(ROOT), stderr=subprocess.PIPE, text=True,
                         env=env)
    assert p.stderr is not None
    line = p.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    assert m, f"hgs serve did not start: {line}{p.stderr.read() if p.poll() is not None else ''}"
    return p, m.group(1)


@pytest.fixture(scope="module")
def guest_images(tmp_path_factory: pytest.TempPathFactory, guest_reference: dict[str, Any]) -> dict[str, Any]:
    """Two golden disks (the same guest; the second one's kernel command line makes its init extend
    PCR 7 once before unlocking) and the reference TCG log of the guest's plain boot."""
    require_tool(*GUEST_TOOLS)
    from .linux_guest_support import build_golden

    d = tmp_path_factory.mktemp("e2e-guest")
    golden = build_golden(d / "golden.img", MARKER)
    golden_x = build_golden(d / "golden-extend7.img", MARKER, extend7=True)
    log = d / "reference.log"
    log.write_bytes(guest_reference["log"])
    return {"dir": d, "golden": golden, "golden_x": golden_x, "log": log}


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory, guest_images: dict[str, Any]):
    """Author, tenant, fabric and one registered host, all through the CLI; one `hgs serve` node."""
    from templatetool.tpm.swtpm import Swtpm

    d = tmp_path_factory.mktemp("e2e-fabric")
    # template author: signing certificate, Linux templates
    _cli("cert", "new", "--signing", "--subject", "CN=E2E Template Signing", "-o", str(d / "author"),
         "--password-env", "AUTHOR_PW")
    templates = {}
    for key, golden in (("t", guest_images["golden"]), ("tx", guest_images["golden_x"])):
        out = d / f"{key}.vhdx"
        _cli("protect", str(golden), "--os", "linux", "-o", str(out), "--name", "E2E-Linux", "--version", "1.0.0.0",
             "--signer", str(d / "author.pfx"), "--password-env", "AUTHOR_PW", "--luks-passphrase-env", "TPL_PW")
        templates[key] = out
    _cli("vsc", "export", str(templates["t"]), "-o", str(d / "t.vsc"))
    # the fabric: guardian + attestation signer, one node on SQLite
    gdir = d / "fabric"
    _cli("guardian", "new", "E2E Fabric HGS", "-o", str(gdir), "--password-env", "HGS_PW")
    _cli("hgs", "init", str(gdir))
    db = f"sqlite:///{d / 'hgs-state.sqlite'}"
    node, url = _start_node(gdir, db)
    sw = Swtpm(d / "host-tpm")
    sw.start()
    try:
        import httpx

        meta = httpx.get(f"{url}/KeyProtection/service/metadata/2014-07/metadata.xml", timeout=30).content
        (d / "fabric.xml").write_bytes(meta)
        # tenant: owner guardian, the fabric imported, PDK, shield
        _cli("guardian", "new", "E2E Tenant Owner", "-o", str(d / "owner"), "--password-env", "OWNER_PW")
        _cli("guardian", "import", str(d / "fabric.xml"), "-o", str(d / "fab"), "--name", "E2E Fabric",
             "--allow-untrusted-root")
        _cli("pdk", "new", "-o", str(d / "tenant.pdk"), "--owner", str(d / "owner"), "--password-env", "OWNER_PW",
             "--guardian", str(d / "fab"), "--vsc", str(d / "t.vsc"), "--version-rule", "ge", "--policy", "shielded")
        # the guarded host: identity, TPM booted as its log says, registered by EK, baseline from the log
        _cli("host", "new", "host-01", "-o", str(d / "host"))
        _extend_host(sw.tcti, HOST_EVENTS)
        (d / "host.log").write_bytes(_host_log())
        _cli("host", "ek", "--tpm", sw.tcti, "-o", str(d / "ek.pem"))
        _cli("hgs", "register-host", str(gdir), "--ek", str(d / "ek.pem"), "--name", "host-01", "--db", db)
        _cli("hgs", "baseline", str(gdir), "--tcg-log", str(d / "host.log"), "--pcrs", "0,4,7", "--db", db)
        yield {"d": d, "gdir": gdir, "url": url, "db": db, "tpm": sw.tcti, "templates": templates,
               "log": guest_images["log"]}
    finally:
        sw.stop()
        node.terminate()
        node.wait(20)


def _shield(fab: dict[str, Any], template: str, out: Path, pdk: Path | None = None) -> None:
    _cli("shield", str(fab["templates"][template]), "--pdk", str(pdk or fab["d"] / "tenant.pdk"),
         "--owner", str(fab["d"] / "owner"), "--owner-password-env", "OWNER_PW", "--guardian", str(fab["d"] / "fab"),
         "-o", str(out), "--tcg-log", str(fab["log"]), "--pcrs", "7", "--template-passphrase-env", "TPL_PW")


def _start(fab: dict[str, Any], vm: Path, host: str = "host", tpm: str | None = None,
           log: Path | None = None) -> subprocess.CompletedProcess[str]:
    serial = vm.with_suffix(".serial")
    return _cli("host", "start", str(vm), "--kp", str(vm.with_suffix(".kp")), "--hgs", fab["url"],
                "--host", str(fab["d"] / host), "--tpm", tpm or fab["tpm"],
                "--tcg-log", str(log or fab["d"] / "host.log"), "--serial-log", str(serial),
                "--memory", "512", "--cpus", "1", "--no-reboot", "--timeout", BOOT_TIMEOUT, "--json", ok=False)


def _serial(vm: Path) -> str:
    p = vm.with_suffix(".serial")
    return p.read_bytes().decode(errors="replace") if p.exists() else ""


def test_shielded_linux_vm_boots_and_unlocks_through_its_vtpm(fabric: dict[str, Any]) -> None:
    vm = fabric["d"] / "ok" / "VM.vhdx"
    vm.parent.mkdir()
    _shield(fabric, "t", vm)
    state0 = vm.with_suffix(".vtpm").read_bytes()
    t0 = time.monotonic()
    cp = _start(fabric, vm)
    took = time.monotonic() - t0
    out = _serial(vm)
    assert cp.returncode == 0, f"{cp.stderr}\n--- serial ---\n{out[-3000:]}"
    r = json.loads(cp.stdout)["result"]
    print(f"\nhost start: {took:.1f} s ({r['vm'].get('accel')}); policy {r['policy']}")
    assert r["policy"] == "shielded"
    assert f"TT-MARKER:{MARKER}" in out, out[-3000:]
    assert "TT-UNLOCK-FAILED" not in out
    assert r["vtpm_state_saved"] is True and vm.with_suffix(".vtpm").read_bytes() != state0


def _refused(fab: dict[str, Any], vm: Path, cp: subprocess.CompletedProcess[str], code: int, disk_sha: str) -> None:
    """Refused with ``code``, one clean line, no VM ran, the disk and its vTPM state unchanged."""
    assert_clean_error(cp, code)
    assert f"TT-MARKER:{MARKER}" not in _serial(vm)
    assert _sha(vm) == disk_sha


def _vm(fab: dict[str, Any], name: str, template: str = "t", pdk: Path | None = None) -> tuple[Path, str]:
    vm = fab["d"] / name / "VM.vhdx"
    vm.parent.mkdir()
    _shield(fab, template, vm, pdk)
    return vm, _sha(vm)


def test_unregistered_host_gets_no_key(fabric: dict[str, Any]) -> None:
    from templatetool.tpm.swtpm import Swtpm

    vm, sha = _vm(fabric, "rogue")
    _cli("host", "new", "rogue", "-o", str(fabric["d"] / "rogue-host"))
    with Swtpm(fabric["d"] / "rogue-tpm") as sw:  # booted exactly like the good host, but never registered
        _extend_host(sw.tcti, HOST_EVENTS)
        cp = _start(fabric, vm, host="rogue-host", tpm=sw.tcti)
    _refused(fabric, vm, cp, 6, sha)
    assert "EK not registered" in cp.stderr or "not registered" in cp.stderr


def test_pcr_baseline_mismatch_gets_no_key(fabric: dict[str, Any]) -> None:
    """A registered host whose boot differs from the baseline (one more PCR 7 event, and a log that
    says so honestly): the quote matches its log, the log does not match the baseline."""
    from templatetool.tpm.eventlog import write_agile_log
    from templatetool.tpm.swtpm import Swtpm

    vm, sha = _vm(fabric, "drift")
    events = [*HOST_EVENTS, (7, b"an unmeasured boot application")]
    log = fabric["d"] / "drift.log"
    log.write_bytes(write_agile_log([(p, 0x80000001, {0x000B: hashlib.sha256(x).digest()}, x) for p, x in events]))
    _cli("host", "new", "host-02", "-o", str(fabric["d"] / "host2"))
    with Swtpm(fabric["d"] / "host2-tpm") as sw:
        _extend_host(sw.tcti, events)
        _cli("host", "ek", "--tpm", sw.tcti, "-o", str(fabric["d"] / "ek2.pem"))
        _cli("hgs", "register-host", str(fabric["gdir"]), "--ek", str(fabric["d"] / "ek2.pem"), "--name", "host-02",
             "--db", fabric["db"])
        cp = _start(fabric, vm, host="host2", tpm=sw.tcti, log=log)
    _refused(fabric, vm, cp, 6, sha)
    assert "baseline" in cp.stderr or "PCR" in cp.stderr


def test_kp_without_this_fabric_gets_no_key(fabric: dict[str, Any]) -> None:
    d = fabric["d"]
    _cli("guardian", "new", "Some Other Fabric", "-o", str(d / "other"), "--no-password")
    _cli("pdk", "new", "-o", str(d / "other.pdk"), "--owner", str(d / "owner"), "--password-env", "OWNER_PW",
         "--guardian", str(d / "other"), "--vsc", str(d / "t.vsc"), "--version-rule", "ge", "--policy", "shielded")
    vm = d / "foreign" / "VM.vhdx"
    vm.parent.mkdir()
    _cli("shield", str(fabric["templates"]["t"]), "--pdk", str(d / "other.pdk"), "--owner", str(d / "owner"),
         "--owner-password-env", "OWNER_PW", "--guardian", str(d / "other"), "-o", str(vm), "--tcg-log",
         str(fabric["log"]), "--pcrs", "7", "--template-passphrase-env", "TPL_PW")
    sha = _sha(vm)
    _refused(fabric, vm, _start(fabric, vm), 5, sha)


def test_tampered_vtpm_state_refused(fabric: dict[str, Any]) -> None:
    vm, sha = _vm(fabric, "tampered")
    st = vm.with_suffix(".vtpm")
    bad = bytearray(st.read_bytes())
    bad[len(bad) // 2] ^= 0x01
    st.write_bytes(bytes(bad))
    cp = _start(fabric, vm)
    _refused(fabric, vm, cp, 4, sha)
    # the fabric's vTPM state ledger refuses first (the state is not the one it knows), before the
    # host's own HMAC check under K and swtpm's (both tested in test_host_start)
    assert "VtpmStateException" in cp.stderr, cp.stderr
    assert st.read_bytes() == bytes(bad)


def test_one_more_pcr7_extend_in_the_guest_keeps_the_disk_sealed(fabric: dict[str, Any]) -> None:
    """The host is healthy and the key is released, but the guest's own boot differs (its init
    extends PCR 7 once before unlocking): the vTPM refuses to unseal, the root stays locked."""
    vm, sha = _vm(fabric, "guest-drift", template="tx")
    cp = _start(fabric, vm)
    out = _serial(vm)
    assert cp.returncode == 0, cp.stderr
    assert "TT-UNLOCK-FAILED" in out, out[-3000:]
    assert f"TT-MARKER:{MARKER}" not in out
