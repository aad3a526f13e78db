"""``host start``: boot a shielded VM under QEMU with OVMF and its own vTPM (swtpm).

The VM's vTPM state (swtpm ``tpm2-00.permall``, encrypted under the key K the KP released) is
checked against K (HMAC) first, then swtpm runs on it in a private 0700 run folder with K handed
over through a pipe fd (never argv, a file or the environment) and its control channel on a unix
socket there; QEMU connects with ``-tpmdev emulator`` + ``-device tpm-crb``. Firmware: OVMF code
read-only (``-drive if=pflash``) and a per-run copy of its variable store. Policy ``shielded``
allows no console (``-display none``, no monitor, no interactive serial; the serial port may go
to a log file); ``encryption-supported`` allows ``serial`` (stdio) or ``vnc``. KVM is used when
it runs a guest (probed by a one-instruction VM, and QEMU is restarted under TCG if KVM fails on
the real firmware), else TCG. After QEMU exits swtpm is stopped and the state as it left it
(still encrypted under K) is returned.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import IntegrityError, NotFoundError, PolicyError, ResourceError, UsageError

STATE_FILE = "tpm2-00.permall"
POLICIES = ("shielded", "encryption-supported")
CONSOLES = ("none", "serial", "vnc")
ACCELS = ("auto", "kvm", "tcg")

#: OVMF builds (code, vars) searched in this order (Debian/Ubuntu ovmf, Fedora edk2-ovmf).
OVMF_PAIRS = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
]
#: Secure Boot builds: SMM code + a variable store with Microsoft's keys enrolled.
OVMF_SECBOOT_PAIRS = [
    ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    ("/usr/share/OVMF/OVMF_CODE.secboot.fd", "/usr/share/OVMF/OVMF_VARS.ms.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd", "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd"),
]

#: What QEMU prints when KVM cannot run the guest (seen on nested hosts whose /dev/kvm opens).
KVM_FAILURE = b"KVM internal error"


@dataclass
class VmConfig:
    """How to run one VM. ``policy`` comes from the VM's released secret, never from the host."""

    disk: Path
    policy: str = "shielded"
    console: str = "none"
    serial_log: Path | None = None
    memory_mib: int = 2048
    cpus: int = 2
    accel: str = "auto"
    secure_boot: bool = False
    ovmf_code: Path | None = None
    ovmf_vars: Path | None = None
    no_reboot: bool = False
    timeout: float | None = None
    vnc_display: int = 0
    qemu: str = "qemu-system-x86_64"
    extra_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Refuse a console the policy does not allow, and impossible settings (before anything runs)."""
        if self.policy not in POLICIES:
            raise PolicyError(
                f"unknown VM policy {self.policy!r}", "VM secret", "the KP names shielded or encryption-supported"
            )
        if self.console not in CONSOLES:
            raise UsageError(f"--console must be one of {', '.join(CONSOLES)}")
        if self.policy == "shielded" and self.console != "none":
            raise PolicyError(
                f"the VM's policy is shielded: no console ({self.console!r} refused)",
                str(self.disk),
                "only encryption-supported VMs allow a console",
            )
        if self.accel not in ACCELS:
            raise UsageError(f"--accel must be one of {', '.join(ACCELS)}")
        if not 128 <= self.memory_mib <= 1 << 20 or not 1 <= self.cpus <= 256:
            raise UsageError("memory must be 128 MiB .. 1 TiB and cpus 1..256")
        if not self.disk.is_file():
            raise NotFoundError("VM disk not found", str(self.disk))


def find_ovmf(
    secure_boot: bool = False, code: Path | None = None, vars_template: Path | None = None
) -> tuple[Path, Path]:
    """The OVMF code and variable-store template to boot with (NotFoundError if none installed)."""
    if code is not None or vars_template is not None:
        if code is None or vars_template is None:
            raise UsageError("give --ovmf-code and --ovmf-vars together")
        for p in (code, vars_template):
            if not p.is_file():
                raise NotFoundError("OVMF file not found", str(p))
        return code, vars_template
    for c, v in OVMF_SECBOOT_PAIRS if secure_boot else OVMF_PAIRS:
        if os.path.isfile(c) and os.path.isfile(v):
            return Path(c), Path(v)
    raise NotFoundError(
        "no OVMF firmware found" + (" (Secure Boot build)" if secure_boot else ""),
        "/usr/share/OVMF",
        "apt install ovmf",
    )


def kvm_usable(dev: str = "/dev/kvm") -> bool:
    """True when KVM runs a guest here: a one-page VM executes ``hlt`` at the reset vector.
    (Opening /dev/kvm is not enough: on some nested hosts it opens and KVM_CREATE_VM works.)"""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    fds = [fd]
    try:
        if fcntl.ioctl(fd, 0xAE00) != 12:  # KVM_GET_API_VERSION
            return False
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        fds.append(vm)
        mem = mmap.mmap(-1, 0x10000, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mem[0xFFF0:0xFFF6] = bytes.fromhex("b8341201c0f4")  # mov ax,0x1234; add ax,ax; hlt
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        # KVM_SET_USER_MEMORY_REGION: slot 0 at 0xFFFF0000 (the reset vector is 0xFFFFFFF0)
        fcntl.ioctl(vm, 0x4020AE46, struct.pack("=IIQQQ", 0, 0, 0xFFFF0000, 0x10000, addr))
        vcpu = fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU
        fds.append(vcpu)
        size = fcntl.ioctl(fd, 0xAE04)  # KVM_GET_VCPU_MMAP_SIZE
        run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            fcntl.ioctl(vcpu, 0xAE80, 0)  # KVM_RUN
            return bool(struct.unpack_from("=I", run, 8)[0] == 5)  # KVM_EXIT_HLT
        finally:
            run.close()
    except OSError:
        return False
    finally:
        for f in reversed(fds):
            os.close(f)


def build_qemu_argv(cfg: VmConfig, *, code: Path, vars_copy: Path, tpm_socket: Path, accel: str) -> list[str]:
    """The QEMU command line for ``cfg`` (no secret is ever on it)."""
    machine = "q35,smm=on" if cfg.secure_boot else "q35"
    argv = [
        cfg.qemu,
        "-name",
        cfg.disk.stem[:64],
        "-machine",
        machine,
        "-accel",
        accel,
        "-m",
        str(cfg.memory_mib),
        "-smp",
        str(cfg.cpus),
        "-nodefaults",
        "-no-user-config",
    ]
    if cfg.secure_boot:
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-chardev",
        f"socket,id=chrtpm,path={tpm_socket}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        "tpm-crb,tpmdev=tpm0",
    ]
    fmt = "vhdx" if cfg.disk.suffix.lower() == ".vhdx" else "raw"
    argv += [
        "-drive",
        f"file={cfg.disk},format={fmt},if=none,id=disk0,cache=writeback",
        "-device",
        "ide-hd,drive=disk0,bus=ide.0,bootindex=1",
    ]
    if cfg.console == "serial":
        argv += ["-serial", "stdio"]
    elif cfg.serial_log is not None:
        argv += ["-serial", f"file:{cfg.serial_log}"]
    else:
        argv += ["-serial", "none"]
    if cfg.console == "vnc":
        argv += ["-device", "VGA", "-display", f"vnc=127.0.0.1:{cfg.vnc_display}"]
    else:
        argv += ["-display", "none"]
    argv += ["-monitor", "none", "-parallel", "none"]
    if cfg.no_reboot:
        argv.append("-no-reboot")
    return argv + list(cfg.extra_args)


@dataclass
class VmRun:
    """The outcome of a VM run: QEMU's exit status, wall time, accelerator, the vTPM state as
    swtpm left it (encrypted under the same key; not in ``repr``)."""

    exit_code: int
    seconds: float
    accel: str
    argv: list[str]
    final_state: bytes = field(repr=False)
    kvm_fallback: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 2),
            "accel": self.accel,
            "kvm_fallback": self.kvm_fallback,
            "vtpm_state_size": len(self.final_state),
        }


def _tool(name: str, hint: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise ResourceError(f"{name} is not installed", hint=hint)
    return exe


class _VmTpm:
    """swtpm with its control channel on a unix socket in ``rundir`` (for QEMU's -tpmdev emulator)."""

    def __init__(self, rundir: Path, state: bytes, key: bytes) -> None:
        self.rundir = rundir
        self.socket = rundir / "swtpm.sock"
        self.log = rundir / "swtpm.stderr"
        fd = os.open(rundir / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(state)
        r, w = os.pipe()
        try:
            os.write(w, key)
        finally:
            os.close(w)
        args = [
            _tool("swtpm", "apt install swtpm"),
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={rundir},mode=0600",
            "--ctrl",
            f"type=unixio,path={self.socket},mode=0600",
            "--key",
            f"fd={r},format=binary,mode=aes-256-cbc",
        ]
        try:
            with open(self.log, "wb") as log:
                self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(r,)
                )
        finally:
            os.close(r)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ResourceError(f"swtpm did not start: {self.stderr()[:200]}")
            time.sleep(0.01)

    def stderr(self) -> str:
        try:
            return self.log.read_bytes().decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def state(self) -> bytes:
        return (self.rundir / STATE_FILE).read_bytes()


def _run_qemu(argv: list[str], cfg: VmConfig, stderr_path: Path, *, watch_kvm: bool) -> tuple[int, bool]:
    """Run QEMU to completion; (exit status, KVM failed). Under ``watch_kvm`` QEMU is killed as
    soon as it reports that KVM cannot run the guest."""
    stdio: dict[str, int | IO[bytes] | None] = {}
    if cfg.console != "serial":
        stdio = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL}
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stderr=err, **stdio)  # type: ignore[call-overload]
        deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
        try:
            while True:
                try:
                    rc = int(proc.wait(0.2))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if watch_kvm and KVM_FAILURE in stderr_path.read_bytes():  # QEMU pauses the VM: kill it
                    proc.kill()
                    proc.wait()
                    return -1, True
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise ResourceError(f"the VM did not stop within {cfg.timeout:g} s (killed)", str(cfg.disk))
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    # under KVM a QEMU that dies (an assertion on nested hosts) is also a KVM failure
    return rc, watch_kvm and rc != 0


def run_vm(cfg: VmConfig, state: bytes, key: bytes, *, on_start: Callable[[list[str]], None] | None = None) -> VmRun:
    """Boot ``cfg.disk`` with its vTPM ``state`` (encrypted under ``key``) and wait for QEMU to exit.

    A state that does not verify with ``key`` is an IntegrityError before swtpm or QEMU run. A
    QEMU that fails to start is a ResourceError naming its last stderr line."""
    from ..tpm.swtpm_state import KEY_SIZE, decrypt_state

    cfg.check()
    if len(key) != KEY_SIZE:
        raise UsageError(f"the vTPM state key must be {KEY_SIZE} bytes")
    decrypt_state(state, key)  # HMAC first: a wrong K or an altered state never reaches swtpm
    code, vars_template = find_ovmf(cfg.secure_boot, cfg.ovmf_code, cfg.ovmf_vars)
    qemu = _tool(cfg.qemu, "apt install qemu-system-x86")
    accels = ["kvm", "tcg"] if cfg.accel == "auto" and kvm_usable() else ["tcg" if cfg.accel == "auto" else cfg.accel]
    fallback = False
    for i, accel in enumerate(accels):
        rundir = Path(tempfile.mkdtemp(prefix="tt-vm-"))  # 0700
        try:
            vars_copy = rundir / "OVMF_VARS.fd"
            shutil.copyfile(vars_template, vars_copy)
            os.chmod(vars_copy, 0o600)
            tpm = _VmTpm(rundir, state, key)
            try:
                argv = build_qemu_argv(cfg, code=code, vars_copy=vars_copy, tpm_socket=tpm.socket, accel=accel)
                argv[0] = qemu
                if on_start is not None:
                    on_start(argv)
                t0 = time.monotonic()
                rc, kvm_failed = _run_qemu(
                    argv, cfg, rundir / "qemu.stderr", watch_kvm=accel == "kvm" and i + 1 < len(accels)
                )
                seconds = time.monotonic() - t0
            finally:
                tpm.stop()
            if kvm_failed:
                fallback = True
                continue
            if rc != 0:
                lines = (rundir / "qemu.stderr").read_bytes().decode(errors="replace").strip().splitlines()
                if "HMAC" in tpm.stderr() or "decrypt" in tpm.stderr().lower():
                    raise IntegrityError("swtpm refused the vTPM state", "vTPM state", "wrong key or altered state")
                raise ResourceError(f"QEMU failed (exit {rc}): {(lines[-1] if lines else '')[:200]}", str(cfg.disk))
            return VmRun(rc, seconds, accel, argv, tpm.state(), fallback)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
    raise ResourceError(
        "KVM could not run the VM", str(cfg.disk), "retry with the TCG accelerator", code="host.kvm-failed"
    )  # pragma: no cover


__all__ = [
    "ACCELS",
    "CONSOLES",
    "OVMF_PAIRS",
    "POLICIES",
    "VmConfig",
    "VmRun",
    "build_qemu_argv",
    "find_ovmf",
    "kvm_usable",
    "run_vm",
]
