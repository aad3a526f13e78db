"""`decrypt` never depends on the filesystem inside a BitLocker volume (issue 13 item 1).

BitLocker volumes holding FAT32, exFAT, a damaged NTFS (its $MFT zeroed) and random bytes are
encrypted with our encrypt_volume (regions placed in runs the content leaves zero, as a
filesystem's free space would be), then `templatetool decrypt` through the CLI must give the
plaintext bytes exactly, equal to pybde's read, and say in --json / -v that free space was not
used and why. An intact NTFS still takes the sparse path.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from templatetool.bitlocker.volume import FveRegions, ProtectorSpec, encrypt_volume
from templatetool.blockdev import RawFile

from .conftest import require_tool, run_cli
from .test_bitlocker_common import file_sha256, make_ntfs, pybde_sha256

MIB = 1 << 20
REGION = 64 * 1024


def zero_regions(path: Path) -> FveRegions:
    """Four 64 KiB-aligned all-zero windows of the plaintext (after the first MiB) for
    BitLocker's own regions: readers show them as zeros, so the plaintext must be zero there."""
    free = []
    with open(path, "rb") as f:
        f.seek(MIB)
        pos = MIB
        while len(free) < 4:
            b = f.read(REGION)
            if len(b) < REGION:
                break
            if not any(b):
                free.append(pos)
            pos += REGION
    assert len(free) == 4, "test volume has no room for the BitLocker regions"
    return FveRegions((free[0], free[1], free[2]), free[3])


def encrypt_volume_with(plain: Path, out: Path, layout: str = "standard", password: str | None = None,
                        sector_size: int | None = None) -> tuple[str, Path]:
    """Encrypt ``plain`` into ``out`` with a recovery password and a startup key (and a password
    when given); return (recovery password, .BEK path)."""
    specs = [ProtectorSpec("recovery_password"), ProtectorSpec("startup_key")]
    if password:
        specs.append(ProtectorSpec("password", password))
    src = RawFile(plain)
    dst = RawFile.create(out, src.size)
    try:
        r = encrypt_volume(src, dst, protectors=specs, regions=zero_regions(plain), sector_size=sector_size,
                           **({} if layout == "standard" else {"layout": layout}))
    finally:
        src.close()
        dst.close()
    bek = out.with_suffix(".bek")
    bek.write_bytes(r.bek)
    assert r.recovery_password
    return r.recovery_password, bek


encrypt = encrypt_volume_with


def make_fat32(path: Path) -> Path:
    require_tool("mkfs.vfat", "mcopy")
    with open(path, "wb") as f:
        f.truncate(40 * MIB)
    subprocess.run(["mkfs.vfat", "-F", "32", "-s", "1", "-n", "TTEST", str(path)], check=True, capture_output=True)
    data = path.parent / "payload.bin"
    data.write_bytes(hashlib.sha256(b"fat").digest() * 10000)
    subprocess.run(["mcopy", "-i", str(path), str(data), "::payload.bin"], check=True, capture_output=True)
    return path


def make_exfat(path: Path) -> Path:
    require_tool("mkfs.exfat")  # exfatprogs (tools/debian-packages.txt); skips locally, fails in CI
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.exfat", "-L", "TTEST", str(path)], check=True, capture_output=True)
    return path


def make_damaged_ntfs(path: Path) -> Path:
    make_ntfs(path, 16)
    with open(path, "r+b") as f:
        boot = f.read(512)
        cs = struct.unpack_from("<H", boot, 0x0B)[0] * boot[0x0D]
        mft = struct.unpack_from("<Q", boot, 0x30)[0] * cs
        f.seek(mft)
        f.write(bytes(64 * 1024))  # the first 64 records ($MFT, $Bitmap ...) gone
    return path


def make_random(path: Path) -> Path:
    rnd = bytearray(os.urandom(8 * MIB))
    for i in (2, 3, 4, 5):  # room for BitLocker's regions (a filesystem's free space)
        rnd[i * MIB:i * MIB + REGION] = bytes(REGION)
    path.write_bytes(rnd)
    return path


CASES = {"fat32": make_fat32, "exfat": make_exfat, "damaged-ntfs": make_damaged_ntfs, "random": make_random}


@pytest.mark.parametrize("kind", list(CASES))
def test_decrypt_cli_any_content(tmp_path: Path, kind: str) -> None:
    plain = CASES[kind](tmp_path / "plain.img")
    rp, bek = encrypt(plain, tmp_path / "enc.img")
    out = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(tmp_path / "enc.img"), "-o", str(out), "--recovery-password-env", "RP", "--json",
                 env={"RP": rp})
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["free_space"]["used"] is False
    assert doc["free_space"]["reason"]
    size = plain.stat().st_size
    want = file_sha256(plain)
    assert file_sha256(out) == want
    assert pybde_sha256(tmp_path / "enc.img", size, bek_path=bek) == want


def test_decrypt_damaged_ntfs_verbose_says_why(tmp_path: Path) -> None:
    plain = make_damaged_ntfs(tmp_path / "plain.img")
    _rp, bek = encrypt(plain, tmp_path / "enc.img")
    out = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(tmp_path / "enc.img"), "-o", str(out), "--startup-key", str(bek), "-v")
    assert cp.returncode == 0, cp.stderr
    assert "free space not skipped" in cp.stdout and "NTFS" in cp.stdout, cp.stdout
    assert file_sha256(out) == file_sha256(plain)
    cp = run_cli("bitlocker", "info", str(tmp_path / "enc.img"), "--json")  # info never reads the inner FS
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["layout"] == "standard"


def test_free_space_decision(tmp_path: Path) -> None:
    """Intact NTFS → used; damaged NTFS / FAT32 / random → not used, with the reason."""
    from templatetool.pipeline.encrypt import free_space

    good = make_ntfs(tmp_path / "good.img", 16)
    bad = make_damaged_ntfs(tmp_path / "bad.img")
    rnd = make_random(tmp_path / "rnd.img")
    fat = make_fat32(tmp_path / "fat.img")
    verdicts = {}
    for name, p in (("good", good), ("bad", bad), ("rnd", rnd), ("fat", fat)):
        dev = RawFile(p)
        try:
            verdicts[name] = free_space(dev)
        finally:
            dev.close()
    assert verdicts["good"].used and verdicts["good"].skip is not None
    assert not verdicts["bad"].used and "NTFS" in verdicts["bad"].reason and verdicts["bad"].filesystem == "ntfs"
    assert not verdicts["rnd"].used and verdicts["rnd"].filesystem is None
    assert not verdicts["fat"].used and verdicts["fat"].filesystem == "fat32"


def test_decrypt_intact_ntfs_still_sparse(tmp_path: Path) -> None:
    """The optimisation stays on for a clean NTFS (bytes still equal)."""
    plain = make_ntfs(tmp_path / "plain.img", 16)
    _rp, bek = encrypt(plain, tmp_path / "enc.img")
    out = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(tmp_path / "enc.img"), "-o", str(out), "--startup-key", str(bek), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["free_space"]["used"] is True
    assert file_sha256(out) == file_sha256(plain)


def make_ntfs_free_bitmap(path: Path) -> Path:
    """An NTFS whose $Bitmap was zeroed (every cluster "free"): parses, but must not be trusted."""
    require_tool("ntfsinfo")
    make_ntfs(path, 16)
    cp = subprocess.run(["ntfsinfo", "-v", "-F", "/$Bitmap", str(path)], capture_output=True, text=True, check=True)
    lines = cp.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if "Runlist:" in ln and "LCN" in ln)
    _vcn, lcn_s, len_s = lines[head + 1].split()[:3]  # first run: VCN LCN Length
    lcn, length = int(lcn_s, 0), int(len_s, 0)
    with open(path, "r+b") as f:
        f.seek(lcn * 4096)
        f.write(bytes(length * 4096))
    return path


def test_free_space_refuses_zeroed_bitmap(tmp_path: Path) -> None:
    """Regression: a $Bitmap calling the boot sector and $MFT free was trusted as a free map."""
    from templatetool.pipeline.encrypt import free_space

    dev = RawFile(make_ntfs_free_bitmap(tmp_path / "v.img"))
    try:
        fs = free_space(dev)
    finally:
        dev.close()
    assert not fs.used and fs.skip is None
    assert "$Bitmap" in fs.reason
