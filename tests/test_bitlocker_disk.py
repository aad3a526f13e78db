"""Disk level: `templatetool encrypt/decrypt` on the golden disk (GPT) and on a bare NTFS volume.

Judges: qemu-img (VHDX -> raw), pybde, dislocker-file, dissect.fve, ntfsfix -n and ntfscat.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from templatetool.bitlocker.volume import open_fve
from templatetool.blockdev import RawFile, View

from .conftest import FIXTURES, assert_clean_error, require_tool, run_cli
from .test_bitlocker_common import (
    check_spans,
    clusters_overlapping,
    dislocker_decrypt,
    dissect_sha256,
    expected_hashes,
    file_sha256,
    make_ntfs,
    ntfs_file_hashes,
    ntfsfix_clean,
    pybde_sha256,
    spans_sha256,
)

MANIFEST = json.loads((FIXTURES / "golden.json").read_text())
OS = next(p for p in MANIFEST["partitions"] if p["kind"] == "basic-data")


def _extract(disk: Path, off: int, size: int, out: Path) -> Path:
    with open(disk, "rb") as fi, open(out, "wb") as fo:
        fi.seek(off)
        left = size
        while left:
            b = fi.read(min(left, 1 << 20))
            fo.write(b)
            left -= len(b)
    return out


def _outside_equal(a: Path, b: Path, off: int, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if fa.read(off) != fb.read(off):
            return False
        fa.seek(off + size)
        fb.seek(off + size)
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


@pytest.fixture(scope="module")
def golden_enc(tmp_path_factory: pytest.TempPathFactory, ) -> dict:
    require_tool("qemu-img")
    golden = FIXTURES / "golden.vhdx"
    if not golden.exists():
        pytest.fail("fixtures/golden.vhdx missing")
    d = tmp_path_factory.mktemp("golden-bde")
    raw = d / "golden.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(golden), str(raw)], check=True)
    before = file_sha256(raw)
    enc, rpf, bek = d / "enc.raw", d / "rp.txt", d / "key.bek"
    cp = run_cli("encrypt", str(raw), "-o", str(enc), "--recovery-password-out", str(rpf),
                 "--startup-key-out", str(bek), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    return {"dir": d, "raw": raw, "before": before, "enc": enc, "rpf": rpf, "bek": bek, "doc": doc,
            "rp": rpf.read_text().strip()}


def test_encrypt_golden_outputs(golden_enc) -> None:
    g = golden_enc
    doc = g["doc"]
    assert file_sha256(g["raw"]) == g["before"]  # input never modified
    assert doc["partition"] == OS["index"] and doc["volume_offset"] == OS["offset"]
    assert [p["type"] for p in doc["protectors"]] == ["recovery-password", "startup-key"]
    assert "recovery_password" not in doc and g["rp"] not in json.dumps(doc)
    assert stat.S_IMODE(g["rpf"].stat().st_mode) == 0o600 and stat.S_IMODE(g["bek"].stat().st_mode) == 0o600
    assert len(g["bek"].read_bytes()) == 156
    assert _outside_equal(g["raw"], g["enc"], OS["offset"], OS["size"])  # other partitions, GPT copied as-is
    assert not list(g["dir"].glob(".tt-overlay-*"))  # metadata overlay removed
    cp = run_cli("inspect", str(g["enc"]), "--json")
    assert cp.returncode == 0, cp.stderr
    vols = {v["index"]: v for v in json.loads(cp.stdout)["result"]["volumes"]}
    assert vols[OS["index"]]["filesystem"] == "bitlocker"
    assert vols[OS["index"]]["bitlocker"]["method"] == "xts-aes-128"


def test_golden_readers_agree_and_ntfs_intact(golden_enc) -> None:
    g = golden_enc
    d = g["dir"]
    part = _extract(g["enc"], OS["offset"], OS["size"], d / "part.img")
    ours = open_fve(RawFile(part)).unlock(recovery_password=g["rp"])
    dec = d / "ours.img"
    with open(dec, "wb") as f:
        f.writelines(ours.read(pos, min(1 << 20, ours.size - pos)) for pos in range(0, ours.size, 1 << 20))
    want = file_sha256(dec)
    assert pybde_sha256(part, OS["size"], bek_path=g["bek"]) == want
    spans = check_spans(OS["size"], open_fve(RawFile(part)).regions(), 2 << 20)
    assert dissect_sha256(part, OS["size"], bek_path=g["bek"], spans=spans) == \
        spans_sha256(ours.read, spans)
    assert file_sha256(dislocker_decrypt(part, d / "dl.img", recovery_password=g["rp"])) == want
    cp = ntfsfix_clean(dec)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert clusters_overlapping(dec, open_fve(RawFile(part)).regions().spans()) == []
    got = ntfs_file_hashes(dec, OS["files"])
    assert got == OS["files"]


def test_golden_decrypt_cli(golden_enc) -> None:
    g = golden_enc
    out = g["dir"] / "dec.raw"
    cp = run_cli("decrypt", str(g["enc"]), "-o", str(out), "--recovery-password-file", str(g["rpf"]), "--json")
    assert cp.returncode == 0, cp.stderr
    assert _outside_equal(g["raw"], out, OS["offset"], OS["size"])
    vol = _extract(out, OS["offset"], OS["size"], g["dir"] / "dec-part.img")
    assert ntfsfix_clean(vol).returncode == 0
    assert ntfs_file_hashes(vol, OS["files"]) == OS["files"]
    # Encrypting the decrypted disk again reuses the reservation already inside its NTFS.
    again = g["dir"] / "again.raw"
    cp = run_cli("encrypt", str(out), "-o", str(again), "--startup-key-out", str(g["dir"] / "k2.bek"), "--json",
                 "--method", "xts-aes-256")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["reused_reservation"] is True and doc["method"] == "xts-aes-256"
    assert doc["regions"]["metadata_offsets"] == g["doc"]["regions"]["metadata_offsets"]


def test_bare_volume_cli_roundtrip(tmp_path: Path) -> None:
    vol = make_ntfs(tmp_path / "vol.img", 8, 512)
    enc, dec = tmp_path / "enc.img", tmp_path / "dec.img"
    cp = run_cli("encrypt", str(vol), "-o", str(enc), "--show-recovery-password", "--password-env", "TT_PW",
                 "--json", env={"TT_PW": "secret pw"})
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    rp = doc["recovery_password"]
    assert doc["partition"] is None and len(rp) == 55
    assert "secret pw" not in cp.stdout + cp.stderr
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--recovery-password-env", "TT_RP", env={"TT_RP": rp})
    assert cp.returncode == 0, cp.stderr
    assert ntfsfix_clean(dec).returncode == 0
    assert ntfs_file_hashes(dec) == expected_hashes()
    dec.unlink()
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--password-env", "TT_PW", env={"TT_PW": "secret pw"})
    assert cp.returncode == 0, cp.stderr
    assert ntfs_file_hashes(dec) == expected_hashes()


def test_cli_usage_errors(tmp_path: Path) -> None:
    vol = make_ntfs(tmp_path / "vol.img", 8, 512)
    before = file_sha256(vol)
    out = tmp_path / "o.img"
    assert_clean_error(run_cli("encrypt", str(vol), "-o", str(out)), 2)  # no protector
    assert_clean_error(run_cli("encrypt", str(vol), "-o", str(vol), "--show-recovery-password"), 2)
    assert_clean_error(run_cli("encrypt", str(tmp_path / "missing.img"), "-o", str(out),
                               "--show-recovery-password"), 9)
    assert_clean_error(run_cli("decrypt", str(vol), "-o", str(out)), 2)  # no credential
    assert_clean_error(run_cli("decrypt", str(vol), "-o", str(out), "--clear-key"))  # not BitLocker
    assert_clean_error(run_cli("encrypt", str(vol), "-o", str(out), "--password-env", "TT_UNSET_VAR_X"), 5)
    assert_clean_error(run_cli("decrypt", str(vol), "-o", str(out), "--startup-key", str(tmp_path / "no.bek")), 9)
    (tmp_path / "bad.bek").write_bytes(b"\0" * 156)
    enc = tmp_path / "enc.img"
    assert run_cli("encrypt", str(vol), "-o", str(enc), "--show-recovery-password").returncode == 0
    assert_clean_error(run_cli("decrypt", str(enc), "-o", str(out), "--startup-key", str(tmp_path / "bad.bek")), 5)
    assert not out.exists()
    assert file_sha256(vol) == before  # the input is never modified, even by refused commands


def test_vhdx_in_vhdx_out(tmp_path: Path) -> None:
    require_tool("qemu-img")
    out = tmp_path / "enc.vhdx"
    bek, rpf = tmp_path / "k.bek", tmp_path / "rp.txt"
    cp = run_cli("encrypt", str(FIXTURES / "golden.vhdx"), "-o", str(out), "--startup-key-out", str(bek),
                 "--recovery-password-out", str(rpf), "--method", "xts-aes-256")
    assert cp.returncode == 0, cp.stderr
    assert subprocess.run(["qemu-img", "check", str(out)], capture_output=True, check=False).returncode == 0
    raw = tmp_path / "enc.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(out), str(raw)], check=True)
    part = _extract(raw, OS["offset"], OS["size"], tmp_path / "part.img")
    rp = rpf.read_text().strip()
    dl = dislocker_decrypt(part, tmp_path / "dl.img", bek_path=bek)
    assert ntfs_file_hashes(dl, OS["files"]) == OS["files"]
    want = file_sha256(dl)
    assert file_sha256(dislocker_decrypt(part, tmp_path / "dl2.img", recovery_password=rp)) == want
    assert pybde_sha256(part, OS["size"], recovery_password=rp) == want
    assert pybde_sha256(part, OS["size"], bek_path=bek) == want
    ours = open_fve(View(RawFile(raw), OS["offset"], OS["size"])).unlock(recovery_password=rp)
    assert spans_sha256(ours.read, [(0, OS["size"])]) == want
    spans = check_spans(OS["size"], ours.fve.regions(), 1 << 20)
    dl_bytes = dl.read_bytes()
    for kw in ({"bek_path": bek}, {"recovery_password": rp}):
        assert dissect_sha256(part, OS["size"], spans=spans, **kw) == \
            spans_sha256(lambda o, n: dl_bytes[o:o + n], spans)
    # decrypt straight from the VHDX to a new VHDX
    dec = tmp_path / "dec.vhdx"
    cp = run_cli("decrypt", str(out), "-o", str(dec), "--startup-key", str(bek))
    assert cp.returncode == 0, cp.stderr
    dec_raw = tmp_path / "dec.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(dec), str(dec_raw)], check=True)
    vol = _extract(dec_raw, OS["offset"], OS["size"], tmp_path / "dec-part.img")
    assert ntfsfix_clean(vol).returncode == 0
    assert ntfs_file_hashes(vol, OS["files"]) == OS["files"]


@pytest.mark.slow
def test_golden_dissect_full(golden_enc) -> None:
    g = golden_enc
    part = _extract(g["enc"], OS["offset"], OS["size"], g["dir"] / "part-full.img")
    ours = open_fve(RawFile(part)).unlock(bek=g["bek"].read_bytes())
    assert dissect_sha256(part, OS["size"], bek_path=g["bek"]) == spans_sha256(ours.read, [(0, OS["size"])])


def test_golden_partition_choice_errors(golden_enc) -> None:
    g = golden_enc
    out = g["dir"] / "never.raw"
    esp = next(p for p in MANIFEST["partitions"] if p["kind"] == "efi-system")["index"]
    assert_clean_error(run_cli("encrypt", str(g["raw"]), "-o", str(out), "--partition", str(esp),
                               "--show-recovery-password"), 7)  # FAT32: unsupported
    assert_clean_error(run_cli("encrypt", str(g["raw"]), "-o", str(out), "--partition", "9",
                               "--show-recovery-password"), 9)
    assert_clean_error(run_cli("encrypt", str(g["enc"]), "-o", str(out), "--partition", str(OS["index"]),
                               "--show-recovery-password"), 2)  # already encrypted
    assert_clean_error(run_cli("decrypt", str(g["raw"]), "-o", str(out), "--clear-key"), 9)  # nothing encrypted
    assert not out.exists()
    cp = run_cli("bitlocker", "info", str(g["enc"]), "--json")
    assert cp.returncode == 0 and json.loads(cp.stdout)["result"]["partition"] == OS["index"]
