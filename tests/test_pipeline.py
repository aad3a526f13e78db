"""End to end: protect → PDK → shield → guardian dry run → unlock, plus every refusal."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from templatetool.disk import open_disk, select_volume
from templatetool.errors import IntegrityError, PolicyError

from .conftest import GOLDEN, assert_clean_error, require_tool, run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from templatetool.pipeline.demo import run_demo

    d = tmp_path_factory.mktemp("demo")
    rep = run_demo(GOLDEN, d, say=lambda s: None)
    rep["dir"] = d
    return rep


def _volume_bytes(path: Path) -> bytes:
    with open_disk(path) as dev:
        view, _ = select_volume(dev, 3)
        return view.read(0, view.size)


def _same_used_clusters(a: bytes, b: bytes, template: Path) -> bool:
    """Equal on every cluster NTFS uses (and beyond the cluster map); free clusters may differ."""
    import numpy as np

    from templatetool.catalog.ntfs import ntfs_free_map

    with open_disk(template) as dev:
        view, _ = select_volume(dev, 3)
        fm = ntfs_free_map(view)
    cs, n = fm.cluster_size, fm.cluster_count
    if len(a) != len(b) or a[n * cs:] != b[n * cs:]:
        return False
    aa = np.frombuffer(a, np.uint8, n * cs).reshape(n, cs)
    bb = np.frombuffer(b, np.uint8, n * cs).reshape(n, cs)
    return bool((aa[fm.used] == bb[fm.used]).all())


def test_demo_pipeline_ok(demo: dict) -> None:
    assert demo["ok"], demo["dry_run"]
    assert [s["status"] for s in demo["dry_run"]["steps"]] == ["passed"] * 5 + ["skipped", "passed"]
    assert all(s["status"] == "passed" for s in demo["unlock"]["steps"])


def test_unlocked_volume_equals_template_volume(demo: dict) -> None:
    d = demo["dir"]
    assert _volume_bytes(d / "vm-decrypted.vhdx") == _volume_bytes(d / "template.vhdx")
    # the shielded volume itself is BitLocker, the template untouched by shield
    with open_disk(d / "vm.vhdx") as dev:
        view, _ = select_volume(dev, 3)
        assert view.read(3, 8) == b"-FVE-FS-"


def test_shielded_disk_passes_qemu_and_carries_catalog(demo: dict) -> None:
    require_tool("qemu-img")
    d = demo["dir"]
    cp = subprocess.run(["qemu-img", "check", str(d / "vm.vhdx")], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    from templatetool.catalog.vsc import read_vsc_bytes

    assert read_vsc_bytes(d / "vm.vhdx") == read_vsc_bytes(d / "template.vhdx")


def test_escrowed_recovery_password_opens_in_dislocker(demo: dict, tmp_path: Path) -> None:
    require_tool("qemu-img", "dislocker-file")
    d = demo["dir"]
    cp = run_cli("escrow", "open", str(d / "vm.recovery.p7m"), "--owner", str(d / "owner"), "-o", str(tmp_path / "rp"))
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "rp").stat().st_mode & 0o777 == 0o600
    rp = (tmp_path / "rp").read_text().strip()
    raw = tmp_path / "vm.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(d / "vm.vhdx"), str(raw)], check=True)
    with open_disk(raw) as dev:
        view, part = select_volume(dev, 3)
        vol = tmp_path / "vol.bin"
        vol.write_bytes(view.read(0, view.size))
    out = tmp_path / "dislocker.out"
    cp = subprocess.run(["dislocker-file", "-V", str(vol), f"-p{rp}", "--", str(out)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr
    # shield leaves free + unallocated blocks unallocated: readers return garbage only there
    assert _same_used_clusters(out.read_bytes(), _volume_bytes(d / "template.vhdx"), d / "template.vhdx")
    assert out.read_bytes() != _volume_bytes(d / "template.vhdx")  # the sparse path really ran


def test_wrong_guardian_host_and_tampering_refused(demo: dict, tmp_path: Path) -> None:
    from templatetool.guardian.model import generate_guardian, save_guardian
    from templatetool.hgs import AttestationPolicy, init_attestation, new_host
    from templatetool.hgs.host import pem_public
    from templatetool.pipeline.unlock import unlock

    d = demo["dir"]
    # a host the fabric never registered
    new_host("rogue", tmp_path / "rogue")
    rep = unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", tmp_path / "rogue", dry_run=True)
    assert not rep.ok and rep.steps[0].status == "failed" and "host key registered" in rep.steps[0].detail
    assert rep.exit_code == 6
    # a guardian that is not in the KP (with a properly attested host)
    other = tmp_path / "other"
    save_guardian(generate_guardian("Other HGS", "ec-p256"), other, None)
    init_attestation(other)
    pol = AttestationPolicy.load(other)
    h = new_host("h2", tmp_path / "h2")
    pol.add_host_key("h2", pem_public(h.host_key.public_key()))
    pol.save(other)
    rep = unlock(d / "vm.vhdx", d / "vm.kp", other, tmp_path / "h2", dry_run=True)
    assert rep.steps[0].status == "passed"
    assert rep.steps[1].status == "failed", rep.to_json()
    # tampered KP
    kp = bytearray((d / "vm.kp").read_bytes())
    i = kp.index(b"<", len(kp) // 2)
    kp[i + 1] ^= 0x01
    (tmp_path / "bad.kp").write_bytes(bytes(kp))
    rep = unlock(d / "vm.vhdx", tmp_path / "bad.kp", d / "fabric", d / "host", dry_run=True)
    assert rep.steps[1].status == "failed"
    # PCR values of a different boot
    rep = unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", d / "host", dry_run=True, pcr_values={7: b"\x01" * 32, 11: b"\x02" * 32})
    assert rep.steps[3].status == "failed" and "PCR" in rep.steps[3].detail


def test_expired_health_certificate_refused(demo: dict, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from templatetool.hgs import AttestationPolicy, attest, create_evidence, load_attestation, load_host
    from templatetool.pipeline.unlock import unlock

    d = demo["dir"]
    key, cert = load_attestation(d / "fabric")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=10)
    hc, _ = attest(AttestationPolicy.load(d / "fabric"), create_evidence(load_host(d / "host"), at=past), key, cert, at=past)
    (tmp_path / "hc.pem").write_bytes(hc.public_bytes(serialization.Encoding.PEM))
    rep = unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", d / "host", health_cert=tmp_path / "hc.pem", dry_run=True)
    assert rep.steps[1].status == "failed" and "expired" in rep.steps[1].detail


def test_shield_refusals(demo: dict, tmp_path: Path) -> None:
    from templatetool.catalog.qualifier import VolumeIdQualifier
    from templatetool.catalog.vsc import open_vsc, read_vsc_bytes
    from templatetool.guardian.model import generate_guardian, load_guardian
    from templatetool.pdk.document import SecretPart
    from templatetool.pdk.shielding import create_pdk
    from templatetool.pipeline.shield import shield

    d = demo["dir"]
    owner = load_guardian(d / "owner", private=True)
    fabric = load_guardian(d / "fabric")
    vi = open_vsc(read_vsc_bytes(d / "template.vhdx"))
    # qualifier that the template does not satisfy (version must be greater)
    q = VolumeIdQualifier.from_vsc(vi, "gt")
    pdk, _ = create_pdk(owner, [fabric], [q], SecretPart(), "shielded", allow_untrusted_root=True)
    (tmp_path / "gt.pdk").write_bytes(pdk)
    with pytest.raises(PolicyError, match="does not satisfy"):
        shield(d / "template.vhdx", tmp_path / "gt.pdk", tmp_path / "vm.vhdx", owner, pcr_values={7: bytes(32), 11: bytes(32)},
               guardians=[fabric])
    assert not (tmp_path / "vm.vhdx").exists() and not (tmp_path / "vm.kp").exists()
    # wrong owner
    stranger = generate_guardian("Stranger", "ec-p256")
    with pytest.raises((PolicyError, IntegrityError), match="another owner"):
        shield(d / "template.vhdx", d / "tenant.pdk", tmp_path / "vm.vhdx", stranger, pcr_values={7: bytes(32), 11: bytes(32)})
    assert not list(tmp_path.glob("*.vhdx"))


def test_cli_dry_run_json_and_exit_code(demo: dict, tmp_path: Path) -> None:
    d = demo["dir"]
    cp = run_cli("unlock", str(d / "vm.vhdx"), "--kp", str(d / "vm.kp"), "--guardian", str(d / "fabric"),
                 "--host", str(d / "host"), "--dry-run", "--json")
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)["result"]
    assert r["ok"] is True and [s["step"] for s in r["steps"]][0] == "attestation"
    assert run_cli("host", "new", "x", "-o", str(tmp_path / "x")).returncode == 0
    cp = run_cli("unlock", str(d / "vm.vhdx"), "--kp", str(d / "vm.kp"), "--guardian", str(d / "fabric"),
                 "--host", str(tmp_path / "x"), "--dry-run")
    assert cp.returncode == 6
    assert "WILL NOT UNLOCK" in cp.stdout


def test_build_recipe(demo: dict, tmp_path: Path) -> None:
    d = demo["dir"]
    (tmp_path / "vm.tcglog").write_bytes((d / "vm-reference.tcglog").read_bytes())
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[template]
golden = "{GOLDEN}"
output = "out/template.vhdx"
name = "Srv"
version = "1.2.3.4"
signer = "pem:{d / 'signer.key.pem'},{d / 'signer.pem'}"

[pdk]
output = "out/tenant.pdk"
owner = "{d / 'owner'}"
guardians = ["{d / 'fabric'}"]
version_rule = "ge"
policy = "shielded"
allow_untrusted_root = true
spec_values = {{ "@ComputerName@" = "vm7" }}

[shield]
output = "out/vm.vhdx"
tcg_log = "vm.tcglog"
pcrs = [7, 11]

[report]
output = "out/report.json"
""")
    (tmp_path / "out").mkdir()
    cp = run_cli("build", str(recipe), "--json")
    assert cp.returncode == 0, cp.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["artifacts"]) == {"template", "vsc", "pdk", "vm_disk", "kp", "recovery_escrow"}
    assert len(rep["protector_ids"]) == 2 and len(rep["catalog_root"]) == 64
    import hashlib

    assert rep["hashes"]["kp"] == hashlib.sha256((tmp_path / "out" / "vm.kp").read_bytes()).hexdigest()
    rep2 = run_cli("unlock", str(tmp_path / "out" / "vm.vhdx"), "--kp", str(tmp_path / "out" / "vm.kp"), "--guardian",
                   str(d / "fabric"), "--host", str(d / "host"), "--dry-run")
    assert rep2.returncode == 0, rep2.stdout + rep2.stderr


@pytest.mark.parametrize("text, code", [("not toml [", 3), ("[bogus]\nx=1\n", 3), ("[template]\noutput='a'\n", 3),
                                        ("[report]\noutput='r.json'\n", 3)])
def test_bad_recipes(tmp_path: Path, text: str, code: int) -> None:
    (tmp_path / "r.toml").write_text(text)
    assert_clean_error(run_cli("build", str(tmp_path / "r.toml")), code)
    assert not (tmp_path / "r.json").exists()


def test_shield_to_existing_vtpm_and_unlock_via_swtpm(demo: dict, tmp_path: Path) -> None:
    """Seal to a real (emulated) vTPM's SRK; unlock with --tpm: swtpm enforces the PCR policy."""
    import hashlib
    import os

    require_tool("swtpm")
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    from .conftest import require_module

    t = require_module("tpm2_pytss")
    from templatetool.guardian.model import load_guardian
    from templatetool.pipeline.shield import shield
    from templatetool.pipeline.unlock import unlock
    from templatetool.tpm import keys
    from templatetool.tpm import structs as s
    from templatetool.tpm.swtpm import Swtpm

    d = demo["dir"]
    ev = hashlib.sha256(b"vm secure boot policy").digest()
    with Swtpm(tmp_path / "state") as sw:
        esys = t.ESAPI(sw.tcti_loader())
        try:
            tmpl = t.TPM2B_PUBLIC.parse("rsa2048:aes128cfb", objectAttributes=keys.SRK_ATTRIBUTES)
            srk, pub, *_ = esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, t.ESYS_TR.OWNER)
            esys.evict_control(t.ESYS_TR.OWNER, srk, s.SRK_HANDLE)
            esys.flush_context(srk)
            (tmp_path / "srk.pub").write_bytes(pub.marshal())
        finally:
            esys.close()
        owner = load_guardian(d / "owner", private=True)
        rep = shield(d / "template.vhdx", d / "tenant.pdk", tmp_path / "vm.vhdx", owner, tpm_parent=tmp_path / "srk.pub",
                     pcr_values={7: hashlib.sha256(bytes(32) + ev).digest(), 11: bytes(32)},
                     guardians=[load_guardian(d / "fabric")], verify_content=False)
        assert rep["vtpm"]["generated"] is False
        before = unlock(tmp_path / "vm.vhdx", tmp_path / "vm.kp", d / "fabric", d / "host", dry_run=True, tpm_tcti=sw.tcti)
        assert before.steps[3].status == "failed"  # the VM has not booted the sealed chain yet
        esys = t.ESAPI(sw.tcti_loader())
        try:
            vals = t.TPML_DIGEST_VALUES([t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256)])
            vals[0].digest.sha256 = ev
            esys.pcr_extend(t.ESYS_TR.PCR7, vals)
        finally:
            esys.close()
        rep2 = unlock(tmp_path / "vm.vhdx", tmp_path / "vm.kp", d / "fabric", d / "host", output=tmp_path / "plain.vhdx",
                      tpm_tcti=sw.tcti)
    assert rep2.ok, rep2.to_json()
    assert _volume_bytes(tmp_path / "plain.vhdx") == _volume_bytes(d / "template.vhdx")


def test_shield_refuses_tampered_template_in_the_same_pass(demo: dict, tmp_path: Path) -> None:
    import shutil

    from templatetool.catalog.ntfs import ntfs_free_map
    from templatetool.guardian.model import load_guardian
    from templatetool.pipeline.shield import shield
    from templatetool.vhdx import open_vhdx

    d = demo["dir"]
    bad = tmp_path / "template.vhdx"
    shutil.copy(d / "template.vhdx", bad)
    disk = open_vhdx(bad, writable=True)
    try:
        view, _ = select_volume(disk, 3)
        fm = ntfs_free_map(view)
        idx = int(fm.used.nonzero()[0][len(fm.used.nonzero()[0]) // 2])  # a used cluster mid-volume
        off = idx * fm.cluster_size + 100
        b = view.read(off, 1)
        view.write(off, bytes([b[0] ^ 0x5A]))
    finally:
        disk.close()
    with pytest.raises(PolicyError, match="no longer matches"):
        shield(bad, d / "tenant.pdk", tmp_path / "vm.vhdx", load_guardian(d / "owner", private=True),
               pcr_values={7: bytes(32), 11: bytes(32)}, guardians=[load_guardian(d / "fabric")])
    assert not list(tmp_path.glob("vm*")) and not list(tmp_path.glob(".vm*"))


def test_shield_in_place_resumes_after_sigkill(demo: dict, tmp_path: Path) -> None:
    """shield --in-place converts the template itself; killed mid-way, re-running finishes it."""
    import os
    import shutil
    import signal
    import sys
    import time

    d = demo["dir"]
    disk = tmp_path / "big-template.vhdx"
    shutil.copy(d / "template.vhdx", disk)
    zero = "00" * 32
    args = [sys.executable, "-m", "templatetool.cli.main", "-q", "shield", str(disk), "--pdk", str(d / "tenant.pdk"),
            "--owner", str(d / "owner"), "--guardian", str(d / "fabric"), "--in-place",
            "--pcr-values", f"7={zero},11={zero}"]
    env = dict(os.environ, TEMPLATETOOL_INPLACE_CHUNK="4096")  # small steps so the kill lands mid-conversion
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while p.poll() is None and not (tmp_path / "big-template.kp").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    time.sleep(0.3)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    cp = subprocess.run(args + ["--json"], capture_output=True, text=True, env=env)  # re-run = resume from the escrow
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["resumed"] is True  # the kill landed mid-conversion
    rep = run_cli("unlock", str(disk), "--kp", str(tmp_path / "big-template.kp"), "--guardian", str(d / "fabric"),
                  "--host", str(d / "host"), "--dry-run", "--json")
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert json.loads(rep.stdout)["ok"] is True


def _silent_skips(steps: list[dict]) -> list[str]:
    return [s["step"] for s in steps if s["status"] == "skipped" and not s["detail"].strip()]


def test_every_skipped_step_says_why(demo: dict, tmp_path: Path) -> None:
    """The demo's dry run, and dry runs failing early or late: no step is skipped without a reason."""
    from templatetool.hgs import new_host
    from templatetool.pipeline.unlock import unlock

    d = demo["dir"]
    dry = demo["dry_run"]["steps"]
    assert _silent_skips(dry) == [], dry
    assert [s["detail"] for s in dry if s["step"] == "decrypt"] == ["dry run: no decrypted disk is written"]
    new_host("rogue", tmp_path / "rogue")
    variants = {
        "rogue host": unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", tmp_path / "rogue", dry_run=True),
        "other boot": unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", d / "host", dry_run=True,
                             pcr_values={7: b"\x01" * 32, 11: b"\x02" * 32}),
    }
    for what, rep in variants.items():
        steps = rep.to_json()["steps"]
        assert _silent_skips(steps) == [], (what, steps)
        first = next(s for s in steps if s["status"] == "failed")
        after = steps[steps.index(first) + 1:]
        assert after and all(s["status"] == "skipped" and s["detail"] == f"not run: {first['step']} failed"
                             for s in after), (what, steps)
    cp = run_cli("unlock", str(d / "vm.vhdx"), "--kp", str(d / "vm.kp"), "--guardian", str(d / "fabric"),
                 "--host", str(tmp_path / "rogue"), "--dry-run")
    skipped = [ln for ln in cp.stdout.splitlines() if ln.strip().startswith("skipped")]
    assert len(skipped) == 6 and all(ln.split(":", 1)[1].strip() for ln in skipped), cp.stdout
