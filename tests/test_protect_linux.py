"""`protect` for Linux (pipeline/protect_linux.py): GPT disk with ESP + ext4 root in, LUKS2 root and
a signed catalog over the ESP out; judged by cryptsetup, e2fsck, mtools and our vsc verify."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_catalog import make_pfx_signer

from templatetool.catalog.vsc import verify_template
from templatetool.errors import PolicyError
from templatetool.luks import KdfParams, KeyslotSpec, decrypt_image
from templatetool.pipeline.protect_linux import protect_linux

from .conftest import require_tool, run_cli

MiB = 1 << 20
PW = b"tenant passphrase"
ESP = (1 * MiB, 8 * MiB)  # partition 1: offset, size
ROOT = (9 * MiB, 40 * MiB)  # partition 2


def make_linux_disk(tmp: Path, fs_size: int = 24 * MiB) -> tuple[Path, bytes]:
    """A 50 MiB GPT disk: ESP (FAT, a fake UKI) and an ext4 root of ``fs_size`` bytes."""
    require_tool("sgdisk", "mkfs.vfat", "mcopy", "mkfs.ext4")
    disk = tmp / "golden.img"
    disk.write_bytes(b"")
    os.truncate(disk, 50 * MiB)
    subprocess.run(["sgdisk", "-n", f"1:{ESP[0] // 512}:+{ESP[1] // 1024}K", "-t", "1:ef00",
                    "-n", f"2:{ROOT[0] // 512}:+{ROOT[1] // 1024}K", "-t", "2:4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
                    str(disk)], check=True, capture_output=True)
    esp = tmp / "esp.img"
    esp.write_bytes(b"")
    os.truncate(esp, ESP[1])
    subprocess.run(["mkfs.vfat", str(esp)], check=True, capture_output=True)  # FAT16 at 8 MiB
    (tmp / "linux.efi").write_bytes(b"MZ" + os.urandom(100_000))
    subprocess.run(["mcopy", "-i", str(esp), str(tmp / "linux.efi"), "::linux.efi"], check=True, capture_output=True)
    rootdir = tmp / "rootdir"
    (rootdir / "etc").mkdir(parents=True)
    (rootdir / "etc" / "marker").write_text("shielded linux root\n")
    root = tmp / "root.ext4"
    root.write_bytes(b"")
    os.truncate(root, fs_size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(rootdir), str(root)], check=True, capture_output=True)
    with open(disk, "r+b") as f:
        f.seek(ESP[0])
        f.write(esp.read_bytes())
        f.seek(ROOT[0])
        f.write(root.read_bytes())
    return disk, root.read_bytes()


def _part(img: Path, off_size: tuple[int, int], out: Path) -> Path:
    with open(img, "rb") as f:
        f.seek(off_size[0])
        out.write_bytes(f.read(off_size[1]))
    return out


def test_protect_linux_raw(tmp_path: Path) -> None:
    require_tool("cryptsetup", "e2fsck")
    disk, fs = make_linux_disk(tmp_path)
    before = disk.read_bytes()
    signer = make_pfx_signer(tmp_path)
    out = tmp_path / "template.img"
    res = protect_linux(disk, out, "LinuxT", "1.0.0.0", signer, [KeyslotSpec(PW, KdfParams("pbkdf2", iterations=1000))],
                        block_size=MiB)
    assert disk.read_bytes() == before  # input untouched
    assert res["luks"]["data_size"] == ROOT[1] - 16 * MiB and res["esp"]["offset"] == ESP[0]
    # the ESP and the GPT are copied as they were; the VSC over the ESP verifies
    raw = out.read_bytes()
    assert raw[:ROOT[0]] == before[:ROOT[0]] and raw[ROOT[0] + ROOT[1]:] == before[ROOT[0] + ROOT[1]:]
    rep = verify_template(out)
    assert rep.ok, rep.problems
    # the root partition is a LUKS2 volume cryptsetup accepts; decrypted, e2fsck finds our filesystem
    luks = _part(out, ROOT, tmp_path / "root.luks")
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(luks)], input=PW,
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    plain = tmp_path / "root.plain"
    decrypt_image(luks, plain, PW)
    assert plain.read_bytes()[:len(fs)] == fs
    r2 = subprocess.run(["e2fsck", "-n", "-f", str(plain)], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    # the ciphertext does not carry the plaintext
    assert b"shielded linux root" not in raw[ROOT[0]:ROOT[0] + ROOT[1]]
    # a changed byte in the ESP (the UKI) is caught by the catalog
    bad = bytearray(raw)
    bad[ESP[0] + 4 * MiB] ^= 1
    out.write_bytes(bad)
    assert not verify_template(out).ok


def test_protect_linux_refuses_a_full_partition(tmp_path: Path) -> None:
    disk, _ = make_linux_disk(tmp_path, fs_size=ROOT[1])
    with pytest.raises(PolicyError, match="16 MiB"):
        protect_linux(disk, tmp_path / "t.img", "T", "1.0.0.0", make_pfx_signer(tmp_path),
                      [KeyslotSpec(PW, KdfParams("pbkdf2", iterations=1000))])
    assert not (tmp_path / "t.img").exists()


def test_luks_protect_cli_vhdx(tmp_path: Path) -> None:
    disk, _ = make_linux_disk(tmp_path)
    signer = make_pfx_signer(tmp_path)
    out = tmp_path / "template.vhdx"
    run_cli("luks", "protect", str(disk), "-o", str(out), "--name", "LinuxT", "--version", "1.0.0.1",
            "--signer", signer.path, "--passphrase-env", "LUKS_PW", "--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000",
            env={"LUKS_PW": PW.decode()}, check=True)
    cp = run_cli("vsc", "verify", str(out))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # qemu-img reads the VHDX; the root partition inside it is LUKS2 that cryptsetup opens
    require_tool("qemu-img", "cryptsetup")
    assert subprocess.run(["qemu-img", "check", "-f", "vhdx", str(out)], capture_output=True).returncode == 0
    raw = tmp_path / "flat.img"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(out), str(raw)], check=True)
    luks = _part(raw, ROOT, tmp_path / "root.luks")
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(luks)], input=PW,
                       capture_output=True)
    assert r.returncode == 0, r.stderr


def test_protect_os_linux(tmp_path: Path) -> None:
    """`protect --os linux` runs the Linux pipeline from the main protect command."""
    from .conftest import assert_clean_error

    disk, _ = make_linux_disk(tmp_path)
    signer = make_pfx_signer(tmp_path)
    out = tmp_path / "template.img"
    cp = run_cli("protect", str(disk), "--os", "linux", "-o", str(out), "--name", "LinuxT", "--version", "1.0.0.2",
                 "--signer", signer.path, "--luks-passphrase-env", "LUKS_PW", "--json",
                 env={"LUKS_PW": PW.decode()}, check=True)
    assert '"luks"' in cp.stdout and (tmp_path / "template.img.vsc").exists()
    assert verify_template(out).ok
    assert_clean_error(run_cli("protect", str(disk), "--os", "linux", "--check"), 2)
