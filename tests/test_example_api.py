"""docs/examples/shield_in_python.py runs end to end (issue 14 item 6), judged by independent readers:
the catalog verifies (ours and openssl cms), the token signed it, the dry run says the guardian
unlocks, and the shielded disk opens in pybde with the recovery password escrowed to the owner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .conftest import GOLDEN, ROOT, require_module, require_tool, run_cli
from .test_pipeline import _same_used_clusters, _volume_bytes
from .test_signers import softhsm  # noqa: F401 - a fixture

EXAMPLE = ROOT / "docs" / "examples" / "shield_in_python.py"
OWNER_PASSWORD = "correct horse battery staple"  # the value the example holds in a variable


def _ok(*args: str) -> None:
    cp = run_cli(*args)
    assert cp.returncode == 0, cp.stderr


def test_example_shields_and_the_guardian_would_unlock(tmp_path: Path, softhsm: dict) -> None:  # noqa: F811
    require_tool("openssl", "qemu-img")
    pybde = require_module("pybde")
    from templatetool.pipeline.demo import demo_tcg_log

    work = tmp_path / "work"
    work.mkdir()
    (work / "golden.vhdx").write_bytes(GOLDEN.read_bytes())
    (work / "reference.tcglog").write_bytes(demo_tcg_log())
    _ok("guardian", "new", "Fabric HGS", "-o", str(work / "fabric"), "--no-password")
    _ok("hgs", "init", str(work / "fabric"))
    _ok("host", "new", "host-01", "-o", str(work / "host"))
    _ok("hgs", "register-host", str(work / "fabric"), "--host", str(work / "host"), "--name", "host-01")

    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's templatetool, as an installed package would be
    cp = subprocess.run([sys.executable, str(EXAMPLE), str(work), softhsm["module"]], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    lines = cp.stdout.splitlines()
    assert lines[-1] == "result: the guardian would unlock this VM", cp.stdout
    passed = {ln.split(":")[0].split(None, 1)[1] for ln in lines if ln.strip().startswith("passed")}
    assert {"attestation", "key release", "vTPM unseal", "BitLocker unlock", "catalog verify"} <= passed, cp.stdout
    assert (work / "owner" / "guardian.json").exists() and (work / "tenant.pdk").stat().st_size > 0

    # the catalog verifies, and the token's key signed it (openssl judges the CMS against the test CA)
    cp = run_cli("vsc", "verify", str(work / "template.vhdx"))
    assert cp.returncode == 0 and cp.stdout.startswith("OK: WS2025-Datacenter 10.0.26100.1"), cp.stdout + cp.stderr
    _ok("vsc", "export", str(work / "template.vhdx"), "-o", str(tmp_path / "t.vsc"))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(softhsm["ca"].public_bytes(serialization.Encoding.PEM))
    cp = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "t.vsc"),
                         "-CAfile", str(ca), "-purpose", "any", "-out", str(tmp_path / "doc.json"),
                         "-signer", str(tmp_path / "signer.pem")], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert x509.load_pem_x509_certificate((tmp_path / "signer.pem").read_bytes()) == softhsm["certs"]["rsa-key"]
    assert b'"WS2025-Datacenter"' in (tmp_path / "doc.json").read_bytes()

    # the owner's escrow (opened with the password the example held) unlocks the VM disk in pybde
    from templatetool import api

    esc = api.open_escrow(work / "vm.recovery.p7m", owner=work / "owner", owner_password=OWNER_PASSWORD)
    assert OWNER_PASSWORD not in repr(esc) and esc.recovery_password not in repr(esc)
    raw = tmp_path / "vm.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(work / "vm.vhdx"), str(raw)], check=True)
    from templatetool.disk import open_disk, select_volume

    vol = tmp_path / "vol.bin"
    with open_disk(raw) as dev:
        view, _ = select_volume(dev, 3)
        vol.write_bytes(view.read(0, view.size))
    v = pybde.volume()
    v.set_recovery_password(esc.recovery_password)
    v.open(str(vol))
    try:
        assert not v.is_locked()
        plain = v.read_buffer_at_offset(v.get_size(), 0)
    finally:
        v.close()
    template_vol = _volume_bytes(work / "template.vhdx")
    assert plain[3:11] == b"NTFS    "
    assert _same_used_clusters(plain, template_vol, work / "template.vhdx")
