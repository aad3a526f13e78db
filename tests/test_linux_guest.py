"""The Linux test guest (tools/linux_guest.py): built from Debian packages, it boots under the host
launcher (QEMU + OVMF + swtpm) from its UKI and reports the firmware's measured boot; its parts
are checked against the independent readers (sgdisk, fsck.fat/mtools, e2fsck, objdump)."""

from __future__ import annotations

import gzip
import hashlib
import struct
import subprocess
from pathlib import Path

from .conftest import require_tool
from .linux_guest_support import build_golden, guest_module

MiB = 1 << 20


def test_pcr_extend_command_layout() -> None:
    cmd = guest_module().pcr_extend_command(7, b"x")
    tag, size, cc, handle, auth_size = struct.unpack(">HIIII", cmd[:18])
    assert (tag, size, cc, handle, auth_size) == (0x8002, len(cmd), 0x182, 7, 9)
    assert cmd[18:22] == (0x40000009).to_bytes(4, "big")  # TPM_RS_PW
    assert cmd[-38:-32] == struct.pack(">IH", 1, 0x000B) and cmd[-32:] == hashlib.sha256(b"x").digest()


def test_cpio_newc_is_read_by_cpio_tools(tmp_path: Path) -> None:
    """Our newc writer against busybox/GNU cpio's reader (whichever is installed)."""
    lg = guest_module()
    data = lg._cpio_newc([("d", 0o40755, b""), ("d/f", 0o100644, b"hello\n"), ("l", 0o120777, b"d/f")])
    import shutil

    tool = shutil.which("cpio") or shutil.which("bsdtar")
    if tool is None:  # parse it back ourselves: magic, names, sizes
        assert data.startswith(b"070701") and b"TRAILER!!!" in data and b"hello\n" in data
        return
    args = [tool, "-t"] if tool.endswith("cpio") else [tool, "-tf", "-"]
    r = subprocess.run(args, input=data, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["d", "d/f", "l"]


def test_golden_disk_layout(tmp_path: Path) -> None:
    """GPT with an ESP holding \\EFI\\BOOT\\BOOTX64.EFI (a PE with the UKI sections) and an ext4
    root (4 KiB blocks) that ends 16 MiB before its partition, holding the marker."""
    require_tool("sgdisk", "mcopy", "e2fsck", "debugfs", "objdump")
    lg = guest_module()
    disk = build_golden(tmp_path / "g.img", "layout-marker")
    out = subprocess.run(["sgdisk", "-p", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "EF00" in out and "8304" in out  # ESP, Linux x86-64 root
    with open(disk, "rb") as f:
        f.seek(MiB)
        esp = f.read(lg.ESP_SIZE)
        f.seek(MiB + lg.ESP_SIZE)
        root = f.read(lg.ROOT_SIZE)
    (tmp_path / "esp.img").write_bytes(esp)
    subprocess.run(["mcopy", "-i", str(tmp_path / "esp.img"), "::/EFI/BOOT/BOOTX64.EFI", str(tmp_path / "uki.efi")],
                   check=True, capture_output=True)
    sections = subprocess.run(["objdump", "-h", str(tmp_path / "uki.efi")], capture_output=True, text=True,
                              check=True).stdout
    for s in (".osrel", ".cmdline", ".linux", ".initrd"):
        assert s in sections, sections
    fs = root[: lg.ROOT_SIZE - lg.LUKS_ROOM]
    assert not any(root[lg.ROOT_SIZE - lg.LUKS_ROOM:])  # the last 16 MiB are free for the LUKS2 header
    (tmp_path / "root.ext4").write_bytes(fs)
    r = subprocess.run(["e2fsck", "-n", "-f", str(tmp_path / "root.ext4")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /tt-marker", str(tmp_path / "root.ext4")], capture_output=True,
                         text=True)
    assert cat.stdout.strip() == "layout-marker"
    assert 1024 << int.from_bytes(fs[1024 + 0x18:1024 + 0x1C], "little") == 4096


def test_initramfs_has_the_stock_unlock_path(tmp_path: Path) -> None:
    """The initramfs carries systemd-cryptsetup, the systemd-tpm2 token plugin and the tpm2-tss
    libraries it dlopens, busybox and the storage/crypto/ext4 modules with their dependencies."""
    lg = guest_module()
    from .linux_guest_support import require_guest

    require_guest()
    root = lg.fetch()
    cpio = gzip.decompress(lg.build_initramfs(root))
    for name in (b"usr/lib/systemd/systemd-cryptsetup", b"libcryptsetup-token-systemd-tpm2.so",
                 b"libtss2-tcti-device.so.0", b"libtss2-esys.so.0", b"bin/busybox", b"init",
                 b"dm-crypt.ko", b"ahci.ko", b"libata.ko", b"ext4.ko", b"jbd2.ko", b"xts.ko"):
        assert name + b"\0" in cpio or b"/" + name + b"\0" in cpio, name
    _vmlinuz, moddir = lg.kernel_of(root)
    order = [p.name for p in lg.module_order(moddir)]
    assert order.index("libata.ko") < order.index("ahci.ko") and order.index("dm-mod.ko") < order.index("dm-crypt.ko")
    assert order.index("jbd2.ko") < order.index("ext4.ko")


def test_reference_boot_reports_its_measured_boot(guest_reference: dict[str, object]) -> None:
    """The plain guest boots (OVMF → UKI → our init) and prints the firmware's TCG log: it parses,
    PCR 7 (Secure Boot policy) has its events and a replay that is not all zeros."""
    from templatetool.tpm.eventlog import parse_log

    log = guest_reference["log"]
    assert isinstance(log, bytes)
    events = parse_log(log, "guest log").events
    assert any(e.pcr == 7 for e in events) and any(e.pcr == 4 for e in events)
    assert guest_reference["pcr7"] not in (bytes(32), b"\xff" * 32)
