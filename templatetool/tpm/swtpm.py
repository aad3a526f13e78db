"""Run a throw-away swtpm (TPM 2.0 emulator) on a free loopback port pair, for tests and dry runs.

``with Swtpm(state_dir) as tpm: ESAPI(tpm.tcti_loader())`` — swtpm listens on 127.0.0.1:P
(commands) and P+1 (control); the process is ours and is terminated (by its pid) on exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, ResourceError

#: swtpm control-channel command CMD_GET_CAPABILITY (u32 big-endian 1).
_CMD_GET_CAPABILITY = (1).to_bytes(4, "big")
#: TPM2_GetRandom(8) with no sessions: tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_GetRandom.
_TPM2_GET_RANDOM = bytes.fromhex("80010000000c0000017b0008")


def _free_port_pair() -> int:
    """A port P such that P and P+1 are both free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p: int = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return p
    raise ResourceError("no free loopback port pair for swtpm")


class Swtpm:
    """A swtpm socket process with its own state directory."""

    def __init__(
        self, state_dir: str | os.PathLike[str] | None = None, pcr_banks: str | None = None, key: bytes | None = None
    ) -> None:
        """``key``: the raw AES-256 key of an encrypted state (passed to swtpm through a pipe fd,
        never argv or a file); a state that does not verify with it is an IntegrityError."""
        self._own_dir = state_dir is None
        self._key = key
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="swtpm-"))
        self.pcr_banks = pcr_banks
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-tss / tpm2-tools / ``--tpm``."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tcti_loader(self) -> Any:
        """A tpm2-pytss TCTILdr connected to this swtpm."""
        from tpm2_pytss import TCTILdr

        return TCTILdr("swtpm", f"host=127.0.0.1,port={self.port}")

    def start(self) -> Swtpm:
        exe = shutil.which("swtpm")
        if exe is None:
            raise ResourceError("swtpm is not installed", hint="apt install swtpm swtpm-tools")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.pcr_banks:
            setup = shutil.which("swtpm_setup")
            if setup is None:
                raise ResourceError("swtpm_setup is not installed")
            subprocess.run(
                [
                    setup,
                    "--tpm2",
                    "--tpmstate",
                    str(self.state_dir),
                    "--pcr-banks",
                    self.pcr_banks,
                    "--config",
                    "/dev/null",
                    "--overwrite",
                ],
                check=True,
                capture_output=True,
            )
        last = ""
        log_path = self.state_dir / "swtpm.stderr"
        for _ in range(10):
            self.port = _free_port_pair()
            args = [
                exe,
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ]
            fds: tuple[int, ...] = ()
            if self._key is not None:
                r, w = os.pipe()
                os.write(w, self._key)
                os.close(w)
                fds = (r,)
                mode = "aes-256-cbc" if len(self._key) == 32 else "aes-128-cbc"
                args += ["--key", f"fd={r},format=binary,mode={mode}"]
            try:
                with open(log_path, "wb") as log:
                    self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, pass_fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._ready():
                    return self
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(5)
            last = log_path.read_bytes().decode(errors="replace").strip()
            if self._key is not None and "HMAC failed" in last:
                raise IntegrityError(
                    "swtpm refused the vTPM state: it does not verify with this key",
                    str(self.state_dir),
                    "wrong transport key, or the state was altered",
                )
        raise ResourceError(f"swtpm did not start: {last[:200]}")

    def _ready(self) -> bool:
        """True once swtpm answers on its control channel. swtpm listens on its sockets before it
        loads the state and initialises libtpms (a wrong key or a bad state ends it then), so an
        accepted TCP connection alone does not mean a working TPM: CMD_GET_CAPABILITY is only
        answered from the main loop, after initialisation."""
        try:
            with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.5) as c:
                c.sendall(_CMD_GET_CAPABILITY)
                if not c.recv(8):
                    return False
            # ... and a TPM command must succeed: under load the control channel was seen answering
            # while a state that does not verify with the key was still being refused (swtpm then
            # exits), so only a TPM response with rc 0 proves the state was loaded
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
                c.sendall(_TPM2_GET_RANDOM)
                head = b""
                while len(head) < 10:
                    part = c.recv(10 - len(head))
                    if not part:
                        return False
                    head += part
                return int.from_bytes(head[6:10], "big") == 0
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
