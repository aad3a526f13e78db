#!/usr/bin/env python3
"""Build a small bootable Linux guest disk for the guarded-fabric tests, from Debian packages.

``python tools/linux_guest.py OUT.img [--marker TEXT] [--extend7]`` writes a raw GPT disk:

* partition 1, the EFI system partition (FAT): ``\\EFI\\BOOT\\BOOTX64.EFI`` is a unified kernel
  image (UKI: systemd-boot's ``linuxx64.efi.stub`` with ``.osrel``, ``.cmdline``, ``.linux`` and
  ``.initrd`` sections added by objcopy), which OVMF boots from the removable-media path;
* partition 2, the root (Discoverable Partitions type "Linux root x86-64"): ext4 holding
  ``/tt-marker``, ending 16 MiB before the partition does, so ``protect --os linux`` can put its
  LUKS2 header in front of it.

The initramfs is busybox (static) plus the unlock tooling of *this* machine (systemd-cryptsetup,
libcryptsetup and systemd's ``systemd-tpm2`` token plugin with the tpm2-tss libraries it dlopens):
the stock unlock path of a Debian 12 system, not ours. Its ``/init``:

* root is LUKS2 → ``systemd-cryptsetup attach root /dev/sda2 - tpm2-device=auto,headless=true``
  (the vTPM unseals the token's secret), mount it read-only and print ``TT-MARKER:<marker>``;
  any failure prints ``TT-UNLOCK-FAILED``;
* root is plain ext4 → print the marker and the firmware's TCG event log in base64 between
  ``TT-TCGLOG-BEGIN`` / ``TT-TCGLOG-END`` (the reference boot the tenant seals to);
* with ``tt.extend7=1`` on the kernel command line (``--extend7``) it first extends PCR 7 once
  more (TPM2_PCR_Extend through /dev/tpm0): a boot that differs from the reference;
* then ``poweroff -f``.

Packages come from the configured apt sources with ``apt-get download`` and are unpacked with
``dpkg-deb -x`` into a cache (``$TEMPLATETOOL_GUEST_CACHE``, default
``~/.cache/templatetool/linux-guest``); nothing is installed on this machine. Host tools needed:
apt-get, dpkg-deb, objcopy (binutils), sgdisk (gdisk), mkfs.fat + mcopy + mmd (dosfstools,
mtools), mkfs.ext4 (e2fsprogs), systemd 252's /usr/lib/systemd/systemd-cryptsetup and the token
plugin (systemd, libcryptsetup12).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

MiB = 1 << 20
ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
ROOT_TYPE = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"  # Linux root (x86-64)
ESP_SIZE = 40 * MiB
ROOT_SIZE = 40 * MiB
#: LUKS2 header room protect --os linux needs at the front of the root partition.
LUKS_ROOM = 16 * MiB
PACKAGES = ("busybox-static", "systemd-boot-efi")
STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
#: Kernel modules the guest needs (their dependencies are added from the modules' .modinfo).
MODULES = ("ahci", "sd_mod", "dm_crypt", "ecb", "xts", "crc32c_generic", "ext4")
CMDLINE = "console=ttyS0,115200 quiet loglevel=1 panic=-1"
UNLOCK_BINARIES = ("/usr/lib/systemd/systemd-cryptsetup",)
#: dlopen'd by libcryptsetup / systemd-shared (ldd cannot see them).
DLOPENED = (
    "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so",
    "/usr/lib/x86_64-linux-gnu/libtss2-esys.so.0",
    "/usr/lib/x86_64-linux-gnu/libtss2-rc.so.0",
    "/usr/lib/x86_64-linux-gnu/libtss2-mu.so.0",
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
)


class GuestBuildError(RuntimeError):
    """A tool or package the guest needs is missing, or a build step failed."""


def cache_dir() -> Path:
    """Where packages are downloaded and unpacked (reused across builds)."""
    return Path(os.environ.get("TEMPLATETOOL_GUEST_CACHE", "~/.cache/templatetool/linux-guest")).expanduser()


def missing_tools() -> list[str]:
    """Host tools the build needs that are not on PATH (or not installed)."""
    need = ["apt-get", "apt-cache", "dpkg-deb", "objcopy", "sgdisk", "mkfs.fat", "mcopy", "mmd", "mkfs.ext4"]
    out = [t for t in need if shutil.which(t) is None]
    out += [p for p in (*UNLOCK_BINARIES, *DLOPENED) if not Path(p).exists()]
    return out


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(argv, capture_output=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise GuestBuildError(f"{argv[0]} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-800:]}")
    return r  # type: ignore[no-any-return]


# -- packages -------------------------------------------------------------------------------------

def kernel_package() -> str:
    """The versioned kernel image package the ``linux-image-amd64`` metapackage depends on."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout.decode()
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise GuestBuildError("no linux-image-*-amd64 package in the apt sources (apt-get update?)")
    return m.group(1)


def fetch(cache: Path | None = None) -> Path:
    """Download and unpack the kernel, busybox-static and systemd-boot-efi; returns the unpacked root."""
    cache = cache or cache_dir()
    root = cache / "root"
    if (root / ".complete").exists():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o755)
    os.chmod(debs, 0o777)  # apt's _apt user downloads into it when it can
    pkgs = [kernel_package(), *PACKAGES]
    r = subprocess.run(["apt-get", "download", *pkgs], cwd=debs, capture_output=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        _run(["apt-get", "download", *pkgs], cwd=debs)
    tmp = Path(tempfile.mkdtemp(prefix="root.", dir=cache))
    for deb in sorted(debs.glob("*.deb")):
        if any(deb.name.startswith(p.replace(":", "%3a") + "_") for p in pkgs):
            _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    (tmp / ".complete").write_text("\n".join(pkgs) + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root


def kernel_of(root: Path) -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of the unpacked kernel."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise GuestBuildError(f"no kernel image in {root}/boot")
    ver = images[-1].name[len("vmlinuz-"):]
    return images[-1], root / "lib" / "modules" / ver


def module_order(moddir: Path, wanted: Iterable[str] = MODULES) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, dependencies first (from each module's
    ``depends=`` and ``softdep=pre:`` in .modinfo; no depmod needed)."""
    index: dict[str, Path] = {}
    for d, _dirs, files in os.walk(moddir / "kernel"):
        for f in files:
            if f.endswith(".ko"):
                index[f[:-3].replace("-", "_")] = Path(d) / f
    alias = {"crypto_crc32c": "crc32c_generic"}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = alias.get(name.replace("-", "_"), name.replace("-", "_"))
        if name in seen:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            return  # built into the kernel
        data = path.read_bytes()
        deps = re.search(rb"\0depends=([^\0]*)\0", data)
        for d in (deps.group(1).decode().split(",") if deps and deps.group(1) else []):
            visit(d)
        for soft in re.findall(rb"\0softdep=pre: ?([^\0]*)\0", data):
            for d in soft.decode().split():
                visit(d)
        order.append(path)

    for w in wanted:
        visit(w)
    return order


# -- initramfs --------------------------------------------------------------------------------------

def _ldd(path: str) -> list[str]:
    out = _run(["ldd", path]).stdout.decode()
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    return libs


def _unlock_files() -> dict[str, bytes]:
    """The unlock tooling with every library it loads: initramfs path → content."""
    files: dict[str, bytes] = {}
    todo = [*UNLOCK_BINARIES, *DLOPENED]
    done: set[str] = set()
    while todo:
        p = todo.pop()
        if p in done:
            continue
        done.add(p)
        real = os.path.realpath(p)
        # merged /usr: keep the name the loader asks for, in the /usr tree
        name = p if p.startswith("/usr/") else "/usr" + p
        files[name] = Path(real).read_bytes()
        todo.extend(_ldd(real) if not real.endswith("ld-linux-x86-64.so.2") else [])
    return files


def pcr_extend_command(pcr: int = 7, data: bytes = b"templatetool guest: one more PCR 7 event") -> bytes:
    """TPM2_PCR_Extend(pcr, sha256(data)) with an empty password session (TPM_RS_PW)."""
    digest = hashlib.sha256(data).digest()
    auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # handle, nonce size, attributes, hmac size
    body = struct.pack(">I", pcr) + struct.pack(">I", len(auth)) + auth + struct.pack(">IH", 1, 0x000B) + digest
    return struct.pack(">HII", 0x8002, 10 + len(body), 0x00000182) + body


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin DM_DISABLE_UDEV=1 SYSTEMD_LOG_TARGET=console SYSTEMD_LOG_LEVEL=err
mkdir -p /proc /sys /dev /run/cryptsetup /tmp /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
grep -q 'tt.debug=1' /proc/cmdline && export SYSTEMD_LOG_LEVEL=debug
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
echo "TT-GUEST-INIT $(uname -r)"
i=0
while { [ ! -b /dev/sda2 ] || [ ! -c /dev/tpmrm0 ]; } && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/sda2 ] || echo "TT-NO-DISK"
[ -c /dev/tpmrm0 ] || echo "TT-NO-TPM"
if grep -q 'tt.extend7=1' /proc/cmdline; then
  exec 3<>/dev/tpm0
  cat /extend7.bin >&3
  dd bs=4096 count=1 <&3 2>/dev/null | od -A n -t x1 | head -1 | sed 's/^/TT-EXTEND7-RESPONSE:/'
  exec 3>&-
fi
if [ "$(dd if=/dev/sda2 bs=4 count=1 2>/dev/null)" = "LUKS" ]; then
  echo "TT-LUKS-ROOT"
  if /usr/lib/systemd/systemd-cryptsetup attach root /dev/sda2 - tpm2-device=auto,headless=true \
      && mount -t ext4 -o ro /dev/mapper/root /mnt; then
    echo "TT-MARKER:$(cat /mnt/tt-marker)"
    umount /mnt
  else
    echo "TT-UNLOCK-FAILED"
  fi
else
  if mount -t ext4 -o ro /dev/sda2 /mnt; then echo "TT-MARKER:$(cat /mnt/tt-marker)"; umount /mnt; fi
  echo "TT-TCGLOG-BEGIN"
  base64 /sys/kernel/security/tpm0/binary_bios_measurements
  echo "TT-TCGLOG-END"
fi
sync
poweroff -f
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio "newc" archive of (path, mode, content); a symlink's content is its target."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08X}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.write(hdr.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def build_initramfs(root: Path) -> bytes:
    """The gzip'd initramfs: busybox, the modules, the unlock tooling, /init, the extend blob."""
    _vmlinuz, moddir = kernel_of(root)
    dirs = {"/bin", "/dev", "/proc", "/sys", "/run", "/tmp", "/mnt", "/usr", "/usr/lib/modules", "/usr/lib64"}
    files: dict[str, tuple[int, bytes]] = {}
    files["/bin/busybox"] = (0o100755, (root / "bin" / "busybox").read_bytes())
    files["/init"] = (0o100755, INIT.encode())
    files["/extend7.bin"] = (0o100644, pcr_extend_command())
    mods = module_order(moddir)
    files["/usr/lib/modules/order"] = (0o100644, "".join(f"{m.name}\n" for m in mods).encode())
    for m in mods:
        files[f"/usr/lib/modules/{m.name}"] = (0o100644, m.read_bytes())
    for name, data in _unlock_files().items():
        files[name] = (0o100755, data)
    for name in list(files):
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/" + "/".join(parts[:i]))
    entries: list[tuple[str, int, bytes]] = [(d.lstrip("/"), 0o40755, b"") for d in sorted(dirs)]
    # merged /usr, as on the host: /lib → usr/lib, /lib64 → usr/lib64 (the ELF interpreter), /sbin → bin
    entries += [("lib", 0o120777, b"usr/lib"), ("lib64", 0o120777, b"usr/lib64"), ("sbin", 0o120777, b"bin")]
    entries += [(n.lstrip("/"), mode, data) for n, (mode, data) in sorted(files.items())]
    return gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0)


def build_uki(root: Path, out: Path, cmdline: str) -> None:
    """A UKI: the systemd-boot stub with the kernel, initramfs, command line and os-release."""
    vmlinuz, _ = kernel_of(root)
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        (t / "initrd").write_bytes(build_initramfs(root))
        (t / "cmdline").write_text(cmdline + "\0")
        (t / "osrel").write_text('NAME="templatetool test guest"\nID=tt-guest\nVERSION_ID=1\n')
        _run([
            "objcopy",
            "--add-section", f".osrel={t / 'osrel'}", "--change-section-vma", ".osrel=0x20000",
            "--add-section", f".cmdline={t / 'cmdline'}", "--change-section-vma", ".cmdline=0x30000",
            "--add-section", f".linux={vmlinuz}", "--change-section-vma", ".linux=0x2000000",
            "--add-section", f".initrd={t / 'initrd'}", "--change-section-vma", ".initrd=0x3000000",
            str(root / STUB), str(out),
        ])


# -- the disk ---------------------------------------------------------------------------------------

def build_disk(
    out: Path, marker: str, *, extend7: bool = False, debug: bool = False, cache: Path | None = None
) -> Path:
    """Write the guest disk (raw GPT) to ``out``; returns ``out``."""
    miss = missing_tools()
    if miss:
        raise GuestBuildError("missing: " + ", ".join(miss))
    root = fetch(cache)
    esp_off, root_off = 1 * MiB, 1 * MiB + ESP_SIZE
    size = root_off + ROOT_SIZE + 1 * MiB
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        uki = t / "BOOTX64.EFI"
        build_uki(root, uki, CMDLINE + (" tt.extend7=1" if extend7 else "") + (" tt.debug=1" if debug else ""))
        esp = t / "esp.img"
        with open(esp, "wb") as f:
            f.truncate(ESP_SIZE)
        _run(["mkfs.fat", "-F", "32", "-n", "TTESP", str(esp)])
        _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"])
        _run(["mcopy", "-i", str(esp), str(uki), "::/EFI/BOOT/BOOTX64.EFI"])
        rootdir = t / "rootfs"
        rootdir.mkdir()
        (rootdir / "tt-marker").write_text(marker)
        fs = t / "root.ext4"
        with open(fs, "wb") as f:
            f.truncate(ROOT_SIZE - LUKS_ROOM)
        _run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "ttroot", "-d", str(rootdir), str(fs)],
             env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
        tmp_out = out.with_name(out.name + ".tmp")
        with open(tmp_out, "wb") as f:
            f.truncate(size)
        _run(["sgdisk", "-n", f"1:{esp_off // 512}:+{ESP_SIZE // 1024}K", "-t", f"1:{ESP_TYPE}", "-c", "1:ESP",
              "-n", f"2:{root_off // 512}:+{ROOT_SIZE // 1024}K", "-t", f"2:{ROOT_TYPE}", "-c", "2:root",
              str(tmp_out)])
        with open(tmp_out, "r+b") as f:
            f.seek(esp_off)
            f.write(esp.read_bytes())
            f.seek(root_off)
            f.write(fs.read_bytes())
        os.replace(tmp_out, out)
    return out


def parse_serial(text: str) -> dict[str, object]:
    """What the guest printed: marker, unlock failure, the TCG log (bytes) of a plain boot."""
    import base64

    clean = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")
    m = re.search(r"TT-MARKER:([^\n]*)", clean)
    log = None
    if "TT-TCGLOG-BEGIN" in clean and "TT-TCGLOG-END" in clean:
        b64 = clean.split("TT-TCGLOG-BEGIN", 1)[1].split("TT-TCGLOG-END", 1)[0]
        log = base64.b64decode("".join(b64.split()))
    return {
        "init": "TT-GUEST-INIT" in clean,
        "marker": m.group(1).strip() if m else None,
        "unlock_failed": "TT-UNLOCK-FAILED" in clean,
        "luks": "TT-LUKS-ROOT" in clean,
        "tcg_log": log,
        "extend7": re.search(r"TT-EXTEND7-RESPONSE:([0-9a-f ]*)", clean).group(1).split()  # type: ignore[union-attr]
        if "TT-EXTEND7-RESPONSE:" in clean else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--marker", default="hello from the templatetool guest")
    ap.add_argument("--extend7", action="store_true", help="init extends PCR 7 once before unlocking")
    ap.add_argument("--debug", action="store_true", help="systemd-cryptsetup logs at debug level")
    a = ap.parse_args()
    build_disk(a.out, a.marker, extend7=a.extend7, debug=a.debug)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
