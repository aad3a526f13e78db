"""unlock: play the guardian and the host offline, end to end, for a shielded VM disk.

attestation → health certificate → key release (KP unwrap, re-wrapped to the host) → host opens
the release → vTPM unseal → BitLocker unlock with the unsealed VMK → decrypt to a new disk (skipped with ``dry_run``) →
verify the decrypted volume against the catalog carried in the VM disk.

A **Linux VM** (shield of a ``protect --os linux`` template: ESP + LUKS2 root) runs the same chain
with its own last steps: the vTPM unseals the systemd-tpm2 token's secret (the boot played in
first, as for Windows), "LUKS2 unlock" opens the token's keyslot with it, "decrypt" writes the
root's plaintext (the filesystem image) to the output, "catalog verify" measures the ESP (the
boot chain the catalog covers) and checks the decrypted root holds an ext filesystem.

The vTPM unseal, by what the VM secret holds: a manufactured vTPM (version 2, ``VM.vtpm`` + K):
the state's hash is checked against the secret, swtpm starts on it with K, the SRK's Name is
checked against the protector's parent Name (TPM2_ReadPublic, before any unseal), the boot is
played into the vTPM (the given TCG log, else the reference boot the secret records) and the
vTPM unseals the VMK under its PCR policy; a software vTPM key: unsealed in software; or a
real TPM via ``tpm_tcti``.

Each step is reported (passed / failed with the reason / skipped). Without ``dry_run`` the first
failure raises its typed error; with ``dry_run`` the report is returned and ``ok`` is False.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    NotFoundError,
    PolicyError,
    TemplateToolError,
    UnsupportedError,
    UsageError,
)
from ..secrets import Secret
from .shield import VmSecret, boot_events, vtpm_state_path


@dataclass
class Step:
    name: str
    status: str = "skipped"  # passed | failed | skipped
    detail: str = ""
    seconds: float = 0.0
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3)}


@dataclass
class UnlockReport:
    steps: list[Step] = field(default_factory=list)
    output: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.status == "passed" or (s.status == "skipped" and s.name == "decrypt") for s in self.steps) and any(
            s.status == "passed" for s in self.steps
        )

    @property
    def exit_code(self) -> int:
        for s in self.steps:
            if s.status == "failed":
                return s.exit_code or 1
        return 0

    @property
    def summary(self) -> str:
        """One line saying what happened: a real unlock, a dry run's verdict, or the refusal."""
        if not self.ok:
            return "WILL NOT UNLOCK"
        if self.output is not None:
            return f"unlocked and decrypted to {self.output}"
        return "the guardian would unlock this VM"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "output": self.output,
            "summary": self.summary,
            "steps": [s.to_json() for s in self.steps],
        }


#: Key protectors and evidence are small documents; refuse absurd sizes before reading them.
MAX_DOCUMENT = 16 << 20


def _read_small(path: str | os.PathLike[str], what: str) -> bytes:
    from ..errors import FormatError

    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_DOCUMENT:
            raise FormatError(f"{what} too large ({size} bytes, limit {MAX_DOCUMENT})", str(p))
        return p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found", str(p)) from None


STEPS = [
    "attestation",
    "key release",
    "host receives key",
    "vTPM unseal",
    "BitLocker unlock",
    "decrypt",
    "catalog verify",
]
#: A Linux VM's steps: the same, with the LUKS2 root in place of BitLocker.
STEPS_LINUX = [("LUKS2 unlock" if s == "BitLocker unlock" else s) for s in STEPS]


def tpm_payloads(fve: Any) -> list[bytes]:
    """The TPM_ENCODED payloads (after BitLocker's u32 PCR bitmap) of a volume's TPM protectors."""
    return list(fve.tpm_blobs())


def release_vm_secret(released: bytes, host_encryption_key: Any, health_cert: Any) -> VmSecret:
    """Host side, after a key release: open it with the host's encryption key and parse the VM
    secret (``VmSecret.vtpm_state_key`` is K for ``VM.vtpm``; see read_vtpm_state)."""
    from ..hgs import open_release

    return VmSecret.from_bytes(open_release(released, host_encryption_key, health_cert))


def read_vtpm_state(path: str | os.PathLike[str], secret: VmSecret) -> bytes:
    """The VM's encrypted vTPM state (``VM.vtpm``), refused unless its SHA-256 is the one the VM
    secret records: a swapped or altered state never reaches swtpm (IntegrityError)."""
    from ..tpm.swtpm_state import MAX_STATE

    if secret.vtpm_state_sha256 is None:
        raise UsageError("the VM secret carries no vTPM state hash (no manufactured vTPM)")
    p = Path(path)
    try:
        if p.stat().st_size > MAX_STATE:
            raise FormatError(f"vTPM state too large ({p.stat().st_size} bytes)", str(p))
        data = p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            "the VM's vTPM state is missing", str(p), "shield writes it as VM.vtpm beside the VM disk; give its path"
        ) from None
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), secret.vtpm_state_sha256):
        raise IntegrityError(
            "the vTPM state is not this VM's: its SHA-256 differs from the key protector's",
            str(p),
            "altered, or the state of another VM",
        )
    return data


def unseal_in_vm_vtpm(
    state: bytes,
    secret: VmSecret,
    payloads: list[bytes],
    *,
    boot: Mapping[int, list[bytes]] | None = None,
    check_hmac: bool = False,
) -> tuple[bytes, str]:
    """Start swtpm on the VM's state with K, check that a vTPM protector is sealed to this vTPM's
    SRK (parent Name = the SRK's Name, by TPM2_ReadPublic: no unseal), play ``boot`` (digests per
    PCR; default the secret's reference boot) into it and unseal the VMK KEY entry through it.
    ``check_hmac`` first verifies the state with K in Python (the dry run's independent proof).
    Returns (KEY entry, what was done)."""
    from ..tpm.protector import parse_protector, unseal_with_tpm
    from ..tpm.swtpm_state import decrypt_state
    from ..tpm.vtpm_manufacture import extend_pcrs, read_srk_name, start_vtpm

    key = secret.vtpm_state_key
    if key is None:
        raise UsageError("the VM secret carries no vTPM state key")
    done = ["VM.vtpm SHA-256 matches the KP"]
    if check_hmac:
        decrypt_state(state, key)  # IntegrityError when the HMAC does not verify with K
        done.append("the state opens with K (HMAC-SHA256 verified)")
    prots = []
    for p in payloads:
        try:
            prots.append(parse_protector(p))
        except (FormatError, UnsupportedError):
            continue
    if not prots:
        raise CredentialError("the volume has no templatetool vTPM protector")
    if boot is None:
        boot = {pcr: [bytes.fromhex(d) for d in ds] for pcr, ds in secret.reference_boot.items()}
    with start_vtpm(state, key) as run:
        name = read_srk_name(run.tcti)
        mine = [p for p in prots if p.parent_name == name]
        if not mine:
            raise IntegrityError(
                "the vTPM protector is sealed to another TPM: its parent Name differs from the vTPM state's SRK Name",
                "vTPM state",
                "the state and the disk are of different VMs",
            )
        done.append(f"swtpm started on it; SRK Name {name.hex()[:16]}... = the protector's parent")
        extend_pcrs(run.tcti, secret.bank, boot)
        entry = unseal_with_tpm(mine[0], run.tcti)
    played = ",".join(map(str, sorted(boot))) or "none"
    done.append(
        f"boot played into the vTPM (PCRs {played}); the vTPM unsealed the VMK "
        f"({secret.bank} PCRs {','.join(map(str, secret.pcrs))})"
    )
    return entry, "; ".join(done)


def unlock(
    vm_disk: str | os.PathLike[str],
    kp_path: str | os.PathLike[str],
    guardian_dir: str | os.PathLike[str],
    host_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    host_evidence: str | os.PathLike[str] | None = None,
    health_cert: str | os.PathLike[str] | None = None,
    guardian_password_env: str | None = None,
    guardian_password: Secret | None = None,
    tpm_tcti: str | None = None,
    pcr_values: Mapping[int, bytes] | None = None,
    dry_run: bool = False,
    vtpm_state: str | os.PathLike[str] | None = None,
    tcg_log: str | os.PathLike[str] | bytes | None = None,
) -> UnlockReport:
    """Run the unlock chain; see the module docstring.

    ``vtpm_state``: the VM's vTPM state (default ``VM.vtpm`` beside ``vm_disk``). ``tcg_log``:
    the VM's boot log, played into its vTPM before the unseal (default: the reference boot
    recorded at shield). ``pcr_values``: the PCR values of the VM's boot; a manufactured vTPM
    measures its own, so there they are only checked against the sealed policy first.
    """
    from ..bitlocker import open_fve
    from ..catalog import VSC_METADATA_GUID
    from ..catalog.vsc import compare_volume, open_vsc
    from ..disk import open_disk, select_volume
    from ..guardian.model import load_guardian
    from ..hgs import (
        AttestationPolicy,
        attest,
        create_evidence,
        load_attestation,
        load_health_certificate,
        load_host,
        release_key,
    )
    from ..tpm.protector import parse_protector, unseal_first_with_tpm, unseal_with_software_key

    if not dry_run and output is None:
        raise UsageError("give -o OUTPUT, or --dry-run")
    linux = _is_linux_vm(vm_disk)
    report = UnlockReport(
        steps=[Step(n) for n in (STEPS_LINUX if linux else STEPS)],
        output=str(output) if output and not dry_run else None,
    )
    steps = {s.name: s for s in report.steps}
    state: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], str]) -> bool:
        st = steps[name]
        t = time.monotonic()
        try:
            st.detail = fn()
            st.status = "passed"
            return True
        except TemplateToolError as e:
            st.status, st.detail, st.exit_code = "failed", str(e), e.exit_code
            if not dry_run:
                raise
            return False
        finally:
            st.seconds = time.monotonic() - t

    def do_attest() -> str:
        host = load_host(host_dir)
        state["host"] = host
        if health_cert:
            state["hc"] = load_health_certificate(health_cert)
            return f"using health certificate {health_cert}"
        ev = _read_small(host_evidence, "host evidence") if host_evidence else create_evidence(host)
        key, cert = load_attestation(guardian_dir)
        hc, checks = attest(AttestationPolicy.load(guardian_dir), ev, key, cert, where=str(host_evidence or "evidence"))
        state["hc"] = hc
        return (
            "; ".join(f"{c.name}: ok" for c in checks)
            + f"; health certificate valid until {hc.not_valid_after_utc:%H:%M} UTC"
        )

    def do_release() -> str:
        kp = _read_small(kp_path, "key protector")
        _key, att_cert = load_attestation(guardian_dir)
        g = load_guardian(guardian_dir, private=True, password=guardian_password, password_env=guardian_password_env)
        state["released"] = release_key(kp, state["hc"], g, att_cert)
        return f"guardian {g.name!r} unwrapped the KP and re-wrapped the key to the host's health certificate"

    def do_host() -> str:
        state["secret"] = release_vm_secret(state["released"], state["host"].encryption_key, state["hc"])
        return "host opened the key release"

    def do_unseal() -> str:
        disk = open_disk(vm_disk)
        state["disk"] = disk
        view, part = select_volume(disk, None)
        state["view"], state["part"] = view, part
        fve = open_fve(view)
        state["fve"] = fve
        payloads = tpm_payloads(fve)
        if not payloads:
            raise CredentialError("the volume has no vTPM protector", str(vm_disk))
        sec: VmSecret = state["secret"]
        if tpm_tcti:
            entry = unseal_first_with_tpm(payloads, tpm_tcti)
            how = f"unsealed by the TPM at {tpm_tcti}"
        elif sec.has_vtpm_state:
            data = read_vtpm_state(vtpm_state if vtpm_state is not None else vtpm_state_path(vm_disk), sec)
            if pcr_values is not None:
                _check_claimed_pcrs(payloads, pcr_values)
            boot = boot_events(tcg_log, sec.bank) if tcg_log is not None else None
            entry, how = unseal_in_vm_vtpm(data, sec, payloads, boot=boot, check_hmac=dry_run)
        else:
            key = sec.private_key()
            if key is None:
                raise CredentialError(
                    "the KP holds no vTPM key (sealed to an existing vTPM)",
                    hint="unseal through the vTPM (tpm_tcti)",
                    code="unlock.no-vtpm-key",
                )
            values = (
                dict(pcr_values) if pcr_values is not None else {k: bytes.fromhex(v) for k, v in sec.pcr_values.items()}
            )
            last: TemplateToolError | None = None
            entry = b""
            for p in payloads:
                try:
                    entry = unseal_with_software_key(parse_protector(p), key, values)
                    break
                except TemplateToolError as e:
                    last = e
            else:
                assert last is not None
                raise last
            how = f"unsealed in software with the released vTPM key ({sec.bank} PCRs {','.join(map(str, sec.pcrs))})"
        state["vmk"] = bytes(entry[-32:])
        return how

    def do_bitlocker() -> str:
        state["plain"] = state["fve"].unlock(vmk=state["vmk"])
        return f"FVEK recovered; {state['fve'].info().get('method')}"

    def do_decrypt() -> str:
        from .encrypt import Credentials, decrypt_disk

        part = state["part"]
        assert output is not None  # checked on entry: not a dry run
        r = decrypt_disk(vm_disk, output, part.index if part else None, Credentials(vmk=state["vmk"]))
        fsp = r["free_space"]
        how = "free space skipped" if fsp["used"] else fsp["reason"]
        return f"decrypted disk written to {output}; {how}"

    def do_verify() -> str:
        vsc = (
            open_vsc(state["disk"].get_user_metadata(VSC_METADATA_GUID))
            if hasattr(state["disk"], "get_user_metadata")
            else None
        )
        if vsc is None:
            raise NotFoundError("the VM disk carries no catalog", str(vm_disk))
        root, changed, files = compare_volume(state["plain"], vsc.document, name_files=True)
        if changed:
            from ..errors import IntegrityError

            raise IntegrityError(
                f"decrypted volume differs from the catalog in {len(changed)} range(s)",
                str(vm_disk),
                "files: " + ", ".join(str(f.get("path", f)) for f in files[:5]),
            )
        return f"decrypted volume matches catalog {vsc.name} {'.'.join(map(str, vsc.version))} (root {root[:16]}...)"

    lx = _LinuxSteps(vm_disk, state, tpm_tcti, pcr_values, tcg_log, vtpm_state, dry_run, output)
    if linux:
        do_unseal, do_decrypt, do_verify = lx.unseal, lx.decrypt, lx.verify
    try:
        chain = [
            ("attestation", do_attest),
            ("key release", do_release),
            ("host receives key", do_host),
            ("vTPM unseal", do_unseal),
            ("LUKS2 unlock", lx.luks) if linux else ("BitLocker unlock", do_bitlocker),
        ]
        ok = True
        for name, fn in chain:
            if not run(name, fn):
                ok = False
                break
        if ok:
            if not dry_run:
                ok = run("decrypt", do_decrypt)
            if ok:
                run("catalog verify", do_verify)
    finally:
        if "disk" in state:
            state["disk"].close()
    _explain_skips(report)
    return report


def _is_linux_vm(vm_disk: str | os.PathLike[str]) -> bool:
    """A Linux VM disk (one ESP and one LUKS2 partition); False when it is not, or does not open
    (the steps then report why)."""
    from ..disk import open_disk
    from .shield_linux import find_linux_root

    try:
        with open_disk(vm_disk) as d:
            return find_linux_root(d) is not None
    except (TemplateToolError, OSError):
        return False


class _LinuxSteps:
    """The Linux VM's vTPM unseal, LUKS2 unlock, decrypt and catalog verify (see the module doc)."""

    def __init__(
        self,
        vm_disk: str | os.PathLike[str],
        state: dict[str, Any],
        tpm_tcti: str | None,
        pcr_values: Mapping[int, bytes] | None,
        tcg_log: str | os.PathLike[str] | bytes | None,
        vtpm_state: str | os.PathLike[str] | None,
        dry_run: bool,
        output: str | os.PathLike[str] | None,
    ) -> None:
        self.vm_disk, self.state, self.tpm_tcti = vm_disk, state, tpm_tcti
        self.pcr_values, self.tcg_log, self.vtpm_state = pcr_values, tcg_log, vtpm_state
        self.dry_run, self.output = dry_run, output

    def unseal(self) -> str:
        from ..blockdev import DeviceIO
        from ..disk import open_disk
        from ..luks.metadata import read_header
        from ..luks.tpm2 import tokens_of, unseal_token
        from ..tpm.policy import compute_policy
        from ..tpm.swtpm_state import decrypt_state
        from ..tpm.vtpm_manufacture import extend_pcrs, start_vtpm
        from .shield_linux import find_linux_root

        st, where = self.state, str(self.vm_disk)
        disk = open_disk(self.vm_disk)
        st["disk"] = disk
        found = find_linux_root(disk)
        if found is None:
            raise FormatError("not a Linux VM disk (one ESP and one LUKS2 partition)", where)
        st["esp"], st["root"] = found
        view = st["root"].view(disk)
        st["view"] = view
        hdr = read_header(DeviceIO(view), where)  # type: ignore[arg-type]
        st["hdr"] = hdr
        toks = tokens_of(hdr.metadata)
        if not toks:
            raise CredentialError("the LUKS2 root has no systemd-tpm2 token", where)
        token = toks[0][1]
        sec: VmSecret = st["secret"]
        if self.pcr_values is not None:
            bank = str(token.get("tpm2-pcr-bank", "sha256"))
            pcrs = [int(p) for p in token.get("tpm2-pcrs", [])]
            if (
                not all(p in self.pcr_values for p in pcrs)
                or compute_policy(bank, {p: self.pcr_values[p] for p in pcrs}).digest.hex()
                != str(token.get("tpm2-policy-hash", "")).lower()
            ):
                raise PolicyError(
                    "PCR values do not satisfy the token's sealed policy",
                    hint="the given PCR values differ from those the root key is sealed to",
                )
        if self.tpm_tcti:
            st["passphrase"] = unseal_token(self.tpm_tcti, token)
            return f"the TPM at {self.tpm_tcti} unsealed the systemd-tpm2 token"
        key = sec.vtpm_state_key
        if key is None:
            raise UnsupportedError("this Linux VM's secret carries no vTPM state key", where)
        data = read_vtpm_state(self.vtpm_state if self.vtpm_state is not None else vtpm_state_path(self.vm_disk), sec)
        done = ["VM.vtpm SHA-256 matches the KP"]
        if self.dry_run:
            decrypt_state(data, key)
            done.append("the state opens with K (HMAC-SHA256 verified)")
        boot = (
            boot_events(self.tcg_log, sec.bank)
            if self.tcg_log is not None
            else {pcr: [bytes.fromhex(d) for d in ds] for pcr, ds in sec.reference_boot.items()}
        )
        with start_vtpm(data, key) as run:
            extend_pcrs(run.tcti, sec.bank, boot)
            st["passphrase"] = unseal_token(run.tcti, token)
        played = ",".join(map(str, sorted(boot))) or "none"
        done.append(
            f"swtpm started on it; boot played in (PCRs {played}); the vTPM unsealed the systemd-tpm2 token "
            f"({token.get('tpm2-pcr-bank')} PCRs {','.join(map(str, token.get('tpm2-pcrs', [])))})"
        )
        return "; ".join(done)

    def luks(self) -> str:
        from ..blockdev import DeviceIO
        from ..luks.volume import _segment_cipher
        from ..luks.volume import unlock as luks_unlock

        st = self.state
        slot, key = luks_unlock(st["hdr"], DeviceIO(st["view"]), st["passphrase"], str(self.vm_disk))  # type: ignore[arg-type]
        st["luks_key"] = key
        offset, ss = _segment_cipher(st["hdr"])
        st["segment"] = (offset, ss)
        return (
            f"keyslot {slot} opened with the token's secret: volume key recovered (aes-xts-plain64, {ss}-byte sectors)"
        )

    def _plain(self, n: int) -> bytes:
        """The first ``n`` plaintext bytes of the root (``n`` a multiple of the sector size)."""
        from ..bitlocker.cipher import XtsCipher
        from ..luks.volume import crypt_units

        offset, ss = self.state["segment"]
        buf = bytearray(self.state["view"].read(offset, n)) + bytes(16)
        crypt_units(XtsCipher(self.state["luks_key"], ss), memoryview(buf), n, 0, False)
        return bytes(buf[:n])

    def decrypt(self) -> str:
        from ..atomic import atomic_output
        from ..bitlocker.cipher import XtsCipher
        from ..luks.volume import crypt_units
        from ..progress import progress

        assert self.output is not None
        st = self.state
        offset, ss = st["segment"]
        view, size = st["view"], st["root"].size - offset
        cipher = XtsCipher(st["luks_key"], ss)
        chunk = 1 << 20
        buf = bytearray(chunk + 16)
        mv = memoryview(buf)
        with atomic_output(self.output, 0o600) as tmp, open(tmp, "r+b") as out, progress(size, "decrypt root") as bar:
            pos = 0
            while pos < size:
                n = min(chunk, size - pos)
                mv[:n] = view.read(offset + pos, n)
                crypt_units(cipher, mv, n, pos, False)
                out.write(mv[:n])
                pos += n
                bar.update(n)
        return f"decrypted root filesystem ({size} bytes) written to {self.output}"

    def verify(self) -> str:
        from ..catalog import VSC_METADATA_GUID
        from ..catalog.measure import FREE_NONE, measure_volume
        from ..catalog.vsc import open_vsc

        st, where = self.state, str(self.vm_disk)
        der = st["disk"].get_user_metadata(VSC_METADATA_GUID) if hasattr(st["disk"], "get_user_metadata") else None
        if der is None:
            raise NotFoundError("the VM disk carries no catalog", where)
        vsc = open_vsc(der)
        esp = st["esp"]
        m = measure_volume(esp.view(st["disk"]), vsc.document.block_size, free_space=FREE_NONE, desc="measuring ESP")
        if m.root != vsc.document.root:
            raise IntegrityError("the VM's ESP (its boot chain) differs from the catalog", where)
        _offset, ss = st["segment"]
        head = self._plain(max(ss, 4096))
        if head[0x438:0x43A] != b"\x53\xef":  # the ext superblock magic, 1024 bytes in
            raise IntegrityError("the decrypted root holds no ext filesystem", where)
        return (
            f"ESP matches catalog {vsc.name} {'.'.join(map(str, vsc.version))} (root {m.root.hex()[:16]}...); "
            "the decrypted root holds an ext filesystem"
        )


def _check_claimed_pcrs(payloads: list[bytes], pcr_values: Mapping[int, bytes]) -> None:
    """PCR values claimed for the VM's boot must satisfy a vTPM protector's sealed policy."""
    from ..tpm.policy import compute_policy
    from ..tpm.protector import parse_protector

    for p in payloads:
        try:
            prot = parse_protector(p)
        except (FormatError, UnsupportedError):
            continue
        if (
            all(i in pcr_values for i in prot.pcrs)
            and compute_policy(prot.bank, {i: pcr_values[i] for i in prot.pcrs}, commands=prot.commands).digest
            == prot.auth_policy
        ):
            return
    raise PolicyError(
        "PCR values do not satisfy the sealed policy",
        hint="the given PCR values differ from those the VMK is sealed to",
    )


def _explain_skips(report: UnlockReport) -> None:
    """Give every skipped step its reason: after a failed step, or the dry run's decrypt."""
    failed: str | None = None
    for s in report.steps:
        if s.status == "failed" and failed is None:
            failed = s.name
        elif s.status == "skipped" and not s.detail:
            s.detail = f"not run: {failed} failed" if failed else "dry run: no decrypted disk is written"
