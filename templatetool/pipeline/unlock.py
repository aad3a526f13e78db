"""unlock: play the guardian and the host offline, end to end, for a shielded VM disk.

attestation → health certificate → key release (KP unwrap, re-wrapped to the host) → host opens
the release → vTPM unseal (software with the released vTPM key, or a real TPM via ``tpm_tcti``)
→ BitLocker unlock with the unsealed VMK → decrypt to a new disk (skipped with ``dry_run``) →
verify the decrypted volume against the catalog carried in the VM disk.

Each step is reported (passed / failed with the reason / skipped). Without ``dry_run`` the first
failure raises its typed error; with ``dry_run`` the report is returned and ``ok`` is False.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CredentialError, NotFoundError, TemplateToolError
from ..signers.base import Secret


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
        return all(s.status == "passed" or (s.status == "skipped" and s.name == "decrypt") for s in self.steps) and \
            any(s.status == "passed" for s in self.steps)

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
        return {"ok": self.ok, "output": self.output, "summary": self.summary,
                "steps": [s.to_json() for s in self.steps]}


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


STEPS = ["attestation", "key release", "host receives key", "vTPM unseal", "BitLocker unlock", "decrypt",
         "catalog verify"]


def tpm_payloads(fve: Any) -> list[bytes]:
    """The TPM_ENCODED payloads (after BitLocker's u32 PCR bitmap) of a volume's TPM protectors."""
    return list(fve.tpm_blobs())


def unlock(vm_disk: str | os.PathLike[str], kp_path: str | os.PathLike[str], guardian_dir: str | os.PathLike[str],
           host_dir: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None,
           host_evidence: str | os.PathLike[str] | None = None, health_cert: str | os.PathLike[str] | None = None,
           guardian_password_env: str | None = None, guardian_password: Secret | None = None,
           tpm_tcti: str | None = None,
           pcr_values: Mapping[int, bytes] | None = None, dry_run: bool = False) -> UnlockReport:
    """Run the unlock chain; see the module docstring."""
    from ..bitlocker import open_fve
    from ..catalog import VSC_METADATA_GUID
    from ..catalog.vsc import compare_volume, open_vsc
    from ..disk import open_disk, select_volume
    from ..guardian.model import load_guardian
    from ..hgs import (AttestationPolicy, attest, create_evidence, load_attestation, load_health_certificate,
                       load_host, open_release, release_key)
    from ..tpm.protector import parse_protector, unseal_first_with_tpm, unseal_with_software_key
    from .shield import VmSecret

    if not dry_run and output is None:
        from ..errors import UsageError

        raise UsageError("give -o OUTPUT, or --dry-run")
    report = UnlockReport(steps=[Step(n) for n in STEPS], output=str(output) if output and not dry_run else None)
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
        return "; ".join(f"{c.name}: ok" for c in checks) + f"; health certificate valid until {hc.not_valid_after_utc:%H:%M} UTC"

    def do_release() -> str:
        kp = _read_small(kp_path, "key protector")
        _key, att_cert = load_attestation(guardian_dir)
        g = load_guardian(guardian_dir, private=True, password=guardian_password,
                          password_env=guardian_password_env)
        state["released"] = release_key(kp, state["hc"], g, att_cert)
        return f"guardian {g.name!r} unwrapped the KP and re-wrapped the key to the host's health certificate"

    def do_host() -> str:
        secret = open_release(state["released"], state["host"].encryption_key, state["hc"])
        state["secret"] = VmSecret.from_bytes(secret)
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
        else:
            key = sec.private_key()
            if key is None:
                raise CredentialError("the KP holds no vTPM key (sealed to an existing vTPM)", hint="unseal through the vTPM (tpm_tcti)",
                                      code="unlock.no-vtpm-key")
            values = dict(pcr_values) if pcr_values is not None else {k: bytes.fromhex(v) for k, v in sec.pcr_values.items()}
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
        r = decrypt_disk(vm_disk, output, part.index if part else None, Credentials(vmk=state["vmk"]))
        fsp = r["free_space"]
        how = "free space skipped" if fsp["used"] else fsp["reason"]
        return f"decrypted disk written to {output}; {how}"

    def do_verify() -> str:
        vsc = open_vsc(state["disk"].get_user_metadata(VSC_METADATA_GUID)) if hasattr(state["disk"], "get_user_metadata") \
            else None
        if vsc is None:
            raise NotFoundError("the VM disk carries no catalog", str(vm_disk))
        root, changed, files = compare_volume(state["plain"], vsc.document, name_files=True)
        if changed:
            from ..errors import IntegrityError

            raise IntegrityError(f"decrypted volume differs from the catalog in {len(changed)} range(s)", str(vm_disk),
                                 "files: " + ", ".join(str(f.get('path', f)) for f in files[:5]))
        return f"decrypted volume matches catalog {vsc.name} {'.'.join(map(str, vsc.version))} (root {root[:16]}...)"

    try:
        chain = [("attestation", do_attest), ("key release", do_release), ("host receives key", do_host),
                 ("vTPM unseal", do_unseal), ("BitLocker unlock", do_bitlocker)]
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


def _explain_skips(report: UnlockReport) -> None:
    """Give every skipped step its reason: after a failed step, or the dry run's decrypt."""
    failed: str | None = None
    for s in report.steps:
        if s.status == "failed" and failed is None:
            failed = s.name
        elif s.status == "skipped" and not s.detail:
            s.detail = f"not run: {failed} failed" if failed else "dry run: no decrypted disk is written"
