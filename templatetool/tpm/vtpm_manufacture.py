"""Manufacture a VM's vTPM with swtpm: a real TPM 2.0 state, encrypted by a transport key K.

``manufacture_vtpm()`` runs ``swtpm_setup --tpm2 --createek --create-spk`` into a private
temporary directory (0700) with the state encrypted from the start under a fresh 32-byte key K
(handed to swtpm_setup through a pipe, never argv or a file), starts swtpm on it once to read the
SRK (0x81000001) and EK (0x81010001) public areas, and optionally seals a secret (the BitLocker
VMK KEY entry) offline to that SRK under a PCR policy (the offline import path of
``protector.seal_to_parent``). The caller gets the encrypted ``tpm2-00.permall`` bytes and K;
only ciphertext ever touches the disk. ``start_vtpm(state, K)`` runs swtpm on such a state
(e.g. to unseal through it). Format: docs/formats/vtpm-state.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, ResourceError, UsageError
from . import structs as s
from .algs import bank_id, digest_size
from .duplicate import MAX_SEALED
from .keys import ParentKey, parse_parent_public
from .policy import compute_policy
from .swtpm import Swtpm
from .swtpm_state import KEY_SIZE, new_transport_key, parse_state

#: swtpm's permanent-state file inside a state directory.
STATE_FILE = "tpm2-00.permall"


@dataclass(frozen=True)
class ManufacturedVtpm:
    """A new vTPM: its encrypted state, the transport key K, its public keys and (optionally) a
    protector sealed to its SRK. ``key`` is secret: it is not part of ``repr`` or ``to_json``."""

    state: bytes = field(repr=False)
    key: bytes = field(repr=False)
    srk: ParentKey
    ek: ParentKey
    protector: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, object]:
        return {
            "state_size": len(self.state),
            "srk_name": self.srk.name.hex(),
            "ek_name": self.ek.name.hex(),
            "srk": self.srk.describe(),
            "ek": self.ek.describe(),
            "protector_size": len(self.protector) if self.protector is not None else None,
        }


def _tss() -> Any:
    """tpm2_pytss, imported on first use (tpmclient's loader, typed for callers here)."""
    from . import tpmclient

    load: Callable[[], Any] = tpmclient._tss
    return load()


def swtpm_missing() -> str | None:
    """The first of swtpm / swtpm_setup not on PATH, or None when both are installed."""
    return next((n for n in ("swtpm", "swtpm_setup") if shutil.which(n) is None), None)


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise ResourceError(f"{name} is not installed", hint="apt install swtpm swtpm-tools")
    return exe


def _setup_argv(state_dir: Path, key_fd: int, pcr_banks: str) -> list[str]:
    return [
        _tool("swtpm_setup"),
        "--tpm2",
        "--createek",
        "--create-spk",
        "--tpmstate",
        str(state_dir),
        "--config",
        "/dev/null",
        "--overwrite",
        "--pcr-banks",
        pcr_banks,
        "--keyfile-fd",
        str(key_fd),
        "--cipher",
        "aes-256-cbc",
    ]


#: How long swtpm_setup may take (it makes two RSA-2048 keys: ~0.6 s here).
SETUP_TIMEOUT_S = 60.0


class PendingVtpm:
    """A vTPM being manufactured: ``swtpm_setup`` runs in the background (a child process, no
    thread) from :func:`begin_manufacture` on, so that a caller can do other work meanwhile (shield
    runs its disk pass); :meth:`result` waits for it and reads the SRK/EK publics. Use it as a
    context manager, or call :meth:`close`: an unfinished swtpm_setup is killed and its private
    directory (ciphertext only) removed."""

    def __init__(self, key: bytes | None = None, pcr_banks: str = "sha256") -> None:
        self._key = new_transport_key() if key is None else bytes(key)
        if len(self._key) != KEY_SIZE:
            raise UsageError(f"the vTPM state key must be {KEY_SIZE} bytes")
        self._made: ManufacturedVtpm | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="vtpm-mfg-"))  # 0700
        # swtpm_setup's messages (no key material); closed by close()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._started = time.monotonic()
        self._proc: subprocess.Popen[bytes] | None = None
        # the key as hex text through a pipe fd (swtpm_setup's --keyfile-fd): 64 bytes, far less
        # than a pipe buffer, so the write cannot block before the child reads it
        r, w = os.pipe()
        try:
            os.write(w, self._key.hex().encode())
            os.close(w)
            w = -1
            self._proc = subprocess.Popen(
                _setup_argv(self._tmp, r, pcr_banks),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(r,),
            )
        except OSError as e:
            self.close()
            raise ResourceError(f"cannot run swtpm_setup: {e.strerror}", hint="apt install swtpm swtpm-tools") from None
        except BaseException:
            self.close()
            raise
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def __enter__(self) -> PendingVtpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def result(self) -> ManufacturedVtpm:
        """The new vTPM (waits for swtpm_setup, then starts swtpm once to read the publics)."""
        if self._made is not None:
            return self._made
        if self._proc is None:
            raise ResourceError("the vTPM manufacture was abandoned")
        try:
            rc = self._proc.wait(timeout=max(1.0, SETUP_TIMEOUT_S - (time.monotonic() - self._started)))
        except subprocess.TimeoutExpired:
            self.close()
            raise ResourceError(f"swtpm_setup did not finish in {SETUP_TIMEOUT_S:.0f} s") from None
        self._proc = None
        state_file = self._tmp / STATE_FILE
        if rc != 0 or not state_file.is_file():
            self._log.seek(0)
            msg = self._log.read().decode(errors="replace").strip().splitlines()
            self.close()
            raise ResourceError(
                f"swtpm_setup failed (exit {rc}): {(msg[-1] if msg else '')[:160]}",
                hint="check the swtpm and swtpm-tools installation",
            )
        try:
            state = state_file.read_bytes()
        finally:
            self.close()
        blob = parse_state(state, "swtpm_setup output")
        if not blob.encrypted:
            raise ResourceError(
                "swtpm_setup wrote an unencrypted state", hint="use swtpm >= 0.7 (state encryption with aes-256-cbc)"
            )
        with start_vtpm(state, self._key) as sw:
            srk, ek = _read_publics(sw)
        self._made = ManufacturedVtpm(state, self._key, srk, ek)
        return self._made

    def close(self) -> None:
        """Kill an unfinished swtpm_setup, remove its directory; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._log.close()


def begin_manufacture(*, key: bytes | None = None, pcr_banks: str = "sha256") -> PendingVtpm:
    """Start manufacturing a vTPM (``swtpm_setup`` in the background, state encrypted under
    ``key``, default a fresh random K); :meth:`PendingVtpm.result` collects it."""
    return PendingVtpm(key, pcr_banks)


class RunningVtpm:
    """A swtpm running on an encrypted state (``tcti`` for tpm2-pytss / tpm2-tools / ``--tpm``).
    After the ``with`` block, ``final_state`` holds the state as swtpm left it (still encrypted
    under the same key): what a VM's vTPM must be saved as when the VM stops."""

    def __init__(self, swtpm: Swtpm) -> None:
        self.swtpm = swtpm
        self.final_state: bytes | None = None

    @property
    def tcti(self) -> str:
        return self.swtpm.tcti


@contextmanager
def start_vtpm(state: bytes, key: bytes) -> Iterator[RunningVtpm]:
    """Run swtpm on an encrypted ``state`` with ``key`` (through a pipe fd) in a private
    temporary directory. A state that does not verify with the key is refused by swtpm:
    IntegrityError. The directory (ciphertext only) is removed on exit."""
    parse_state(state)  # a malformed state is a FormatError before swtpm runs
    if len(key) != KEY_SIZE:
        raise UsageError(f"the vTPM state key must be {KEY_SIZE} bytes")
    tmp = Path(tempfile.mkdtemp(prefix="vtpm-run-"))
    try:
        fd = os.open(tmp / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(state)
        sw = Swtpm(tmp, key=key)
        try:
            sw.start()
        except IntegrityError as e:
            raise IntegrityError(e.what, "vTPM state", e.hint) from None
        run = RunningVtpm(sw)
        try:
            yield run
        finally:
            sw.stop()
        run.final_state = (tmp / STATE_FILE).read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_publics(sw: RunningVtpm) -> tuple[ParentKey, ParentKey]:
    try:
        return (
            _read_public(sw.tcti, s.SRK_HANDLE, "vTPM SRK 0x81000001"),
            _read_public(sw.tcti, s.EK_HANDLE, "vTPM EK 0x81010001"),
        )
    except IntegrityError as e:  # swtpm_setup just made it: a missing key is the tools' fault
        raise ResourceError(
            f"cannot read a public key from the new vTPM: {e.what}", hint="check the swtpm and swtpm-tools installation"
        ) from None


def manufacture_vtpm(
    secret: bytes | None = None,
    pcr_values: Mapping[int, bytes] | None = None,
    bank: str = "sha256",
    *,
    pin: str | None = None,
    key: bytes | None = None,
    pcr_banks: str = "sha256",
) -> ManufacturedVtpm:
    """Make a new vTPM (encrypted under ``key``, default a fresh random K) and, when ``secret``
    is given, seal it to the vTPM's own SRK under PolicyPCR(``pcr_values``) [+ PIN].

    Returns the encrypted state (the bytes of ``tpm2-00.permall``), K, the SRK and EK public and
    the protector payload (docs/formats/vtpm-protector.md, parent handle 0x81000001)."""
    from .protector import seal_to_parent

    if secret is not None and not pcr_values:
        raise UsageError(
            "sealing into the vTPM needs PCR values", hint="give PCR values or a TCG log", code="tpm.pcr-values-needed"
        )
    if secret is None and (pcr_values or pin is not None):
        raise UsageError("PCR values or a PIN without a secret to seal")
    if secret is not None:  # bad input fails before swtpm runs
        assert pcr_values is not None
        if not 0 < len(secret) <= MAX_SEALED:
            raise UsageError(f"secret must be 1..{MAX_SEALED} bytes, got {len(secret)}")
        compute_policy(bank, pcr_values, auth_value=pin is not None)
    with begin_manufacture(key=key, pcr_banks=pcr_banks) as pending:
        made = pending.result()
    srk = made.srk
    protector = None
    if secret is not None:
        assert pcr_values is not None
        protector = seal_to_parent(srk, secret, bank, pcr_values, pin=pin, parent_handle=s.SRK_HANDLE)
    return dataclasses.replace(made, protector=protector)


def read_srk_name(tcti: str) -> bytes:
    """The TPM Name of the persistent SRK (0x81000001) of the (v)TPM at ``tcti``, by
    TPM2_ReadPublic: what a vTPM protector's parent Name must equal (no unseal involved)."""
    return _read_public(tcti, s.SRK_HANDLE, "vTPM SRK 0x81000001").name


def _read_public(tcti: str, handle: int, what: str) -> ParentKey:
    t = _tss()
    from .tpmclient import open_tpm

    esys = open_tpm(tcti)
    try:
        try:
            tr = esys.tr_from_tpmpublic(handle)
            pub, _, _ = esys.read_public(tr)
        except t.TSS2_Exception as e:
            raise IntegrityError(
                f"the {what} is missing from the vTPM (TPM rc 0x{int(e.rc):x})",
                "vTPM state",
                "the state is not a vTPM made by shield",
            ) from None
        return parse_parent_public(bytes(pub.marshal())[2:], what)
    finally:
        esys.close()


def extend_pcrs(tcti: str, bank: str, events: Mapping[int, Sequence[bytes]]) -> None:
    """Extend each PCR of ``bank`` with its digests, in order (TPM2_PCR_Extend): a boot's
    measurements played into a running (v)TPM, e.g. a reference TCG log's for a dry run."""
    t = _tss()
    from .tpmclient import open_tpm

    alg = getattr(t.TPM2_ALG, bank.upper())
    size = digest_size(bank_id(bank))
    esys = open_tpm(tcti)
    try:
        for pcr in sorted(events):
            for d in events[pcr]:
                if len(d) != size:
                    raise UsageError(f"a {bank} digest for PCR {pcr} must be {size} bytes, got {len(d)}")
                vals = t.TPML_DIGEST_VALUES([t.TPMT_HA(hashAlg=alg)])
                setattr(vals[0].digest, bank.lower(), bytes(d))
                try:
                    esys.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), vals)
                except t.TSS2_Exception as e:
                    raise ResourceError(f"the vTPM refused to extend PCR {pcr} (TPM rc 0x{int(e.rc):x})") from None
    finally:
        esys.close()


def unseal_in_vtpm(
    state: bytes,
    key: bytes,
    protector: bytes,
    *,
    pin: str | None = None,
    prepare: Callable[[str], object] | None = None,
) -> bytes:
    """Start swtpm on the encrypted state and unseal ``protector`` through it. ``prepare(tcti)``
    (optional) runs first, e.g. to extend PCRs as a boot would. The TPM enforces the policy."""
    from .protector import unseal_with_tpm

    with start_vtpm(state, key) as sw:
        if prepare is not None:
            prepare(sw.tcti)
        return unseal_with_tpm(protector, sw.tcti, pin=pin)


__all__ = [
    "STATE_FILE",
    "ManufacturedVtpm",
    "RunningVtpm",
    "extend_pcrs",
    "manufacture_vtpm",
    "read_srk_name",
    "start_vtpm",
    "swtpm_missing",
    "unseal_in_vtpm",
]
