"""shield: template + PDK → shielded VM disk (BitLocker, vTPM protector) + key protector (KP).

Steps (every check before any output is written):
1. verify the PDK (owner signature, pinned to the owner given) and open its secret part with the
   owner's key (proves the owner key is the PDK's);
2. verify the template's signed catalog and that it satisfies one of the PDK's volume ID
   qualifiers (else stop with the reason); verify the template volume against the catalog;
3. create the VM's vTPM storage key (or take ``tpm_parent``: an existing vTPM's public key);
4. encrypt the OS volume in BitLocker format with a vTPM protector (PolicyPCR over the given PCR
   values or a replayed TCG log) and a recovery-password protector;
5. escrow the recovery password to the owner (CMS AuthEnvelopedData to the owner's encryption
   certificate, ``VM.recovery.p7m`` beside the disk);
6. write the KP releasing the VM secret (vTPM key) to the PDK's guardians and the owner;
7. copy the template's catalog into the VM disk (so unlock can verify the decrypted volume).
Outputs are new files, written atomically; the template is never modified.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from .. import __version__
from ..atomic import atomic_outputs, no_interrupts
from ..blockdev import CHUNK
from ..errors import PolicyError, ResourceError, UnsupportedError, UsageError
from ..guardian.model import Guardian
from ..secrets import Secret
from .shield_common import (
    POLICIES,
    VM_SECRET_FORMAT,
    VmSecret,
    _check_pdk_and_template,
    _owner_key,
    boot_events,
    embed_vsc,
    owner_escrow,
    pdk_guardians,
    vtpm_state_path,
)

#: The vTPM a shield gives the VM: a swtpm-manufactured vTPM (state in VM.vtpm) or a software key.
VTPM_MODES = ("swtpm", "software")


def shield(
    template: str | os.PathLike[str],
    pdk_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    owner: Guardian,
    *,
    kp_path: str | os.PathLike[str] | None = None,
    tpm_parent: str | os.PathLike[str] | None = None,
    pcrs: Sequence[int] = (7, 11),
    pcr_values: Mapping[int, bytes] | None = None,
    tcg_log: str | os.PathLike[str] | bytes | None = None,
    bank: str = "sha256",
    method: str = "xts-aes-128",
    vtpm_kind: str = "rsa",
    verify_content: bool = True,
    trust: list[Any] | None = None,
    guardians: Sequence[Guardian] = (),
    in_place: bool = False,
    used_space_only: bool = False,
    subformat: str | None = None,
    vtpm: str = "swtpm",
    template_passphrase: Secret | None = None,
) -> dict[str, Any]:
    """Shield ``template`` with the PDK at ``pdk_path``; returns the JSON-ready report.

    A Linux template (``protect --os linux``: ESP + LUKS2 root) goes to
    :func:`templatetool.pipeline.shield_linux.shield_linux`: its root is re-keyed and the new key
    sealed in the VM's vTPM as a systemd-tpm2 token; ``template_passphrase`` opens the template's
    LUKS2 keyslot (asked for only then).

    ``guardians``: guardian folders/metadata for the PDK's guardians, when the PDK does not carry
    their encryption-certificate signatures.

    ``in_place``: for templates too large to copy, convert ``template`` itself into the VM disk
    (``out_path`` is ignored; the KP and escrow are written beside it *before* any sector changes)
    with the resumable in-place conversion; re-running after a crash resumes it, taking the
    recovery password from the owner's escrow. ``used_space_only`` (in place only): spans free in
    NTFS and unallocated in the template stay as they are (a dynamic VHDX keeps its size; see
    :func:`templatetool.api.encrypt_in_place`).

    ``subformat``: fixed or dynamic VM disk; default: the template's (a fixed VHDX stays fixed).

    ``vtpm``: ``"swtpm"`` (default) manufactures the VM's vTPM with swtpm, seals the VMK to its
    SRK and writes its encrypted state as ``VM.vtpm`` beside the disk, the state key K going
    into the KP's VM secret; ``"software"`` generates a software vTPM storage key carried by the
    KP instead (no state file). Ignored with ``tpm_parent`` (the VM's existing vTPM).
    ``vtpm_kind`` (rsa, ec) is the software key's type.
    """
    check_vtpm_mode(vtpm, tpm_parent)
    from .shield_linux import is_linux_template, shield_linux

    if is_linux_template(template):
        if in_place or used_space_only or tpm_parent is not None or vtpm != "swtpm":
            raise UnsupportedError(
                "a Linux template is shielded into a new disk with a manufactured vTPM "
                "(no in-place conversion, existing vTPM parent or software vTPM key)",
                str(template),
            )
        return shield_linux(
            template,
            pdk_path,
            out_path,
            owner,
            template_passphrase=template_passphrase,
            kp_path=kp_path,
            pcrs=pcrs,
            pcr_values=pcr_values,
            tcg_log=tcg_log,
            bank=bank,
            trust=trust,
            guardians=guardians,
            subformat=subformat,
        )
    if in_place:
        if subformat is not None:
            raise UsageError("--subformat needs a new output disk; --in-place keeps the template's")
        return _shield_in_place(
            template,
            pdk_path,
            owner,
            kp_path=kp_path,
            tpm_parent=tpm_parent,
            pcrs=pcrs,
            pcr_values=pcr_values,
            tcg_log=tcg_log,
            bank=bank,
            method=method,
            vtpm_kind=vtpm_kind,
            verify_content=verify_content,
            trust=trust,
            guardians=guardians,
            vtpm=vtpm,
            used_space_only=used_space_only,
        )
    if used_space_only:
        raise UsageError(
            "used space only applies to an in-place shield",
            hint="a new disk already leaves free, unallocated space unwritten",
            code="shield.used-space-only",
        )
    from ..bitlocker import ProtectorSpec, generate_recovery_password
    from ..catalog.vsc import compare_volume
    from ..disk import open_disk, select_volume
    from ..kp import create_kp
    from .encrypt import encrypt_disk

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(out_path)
    if not str(out).lower().endswith(".vhdx"):
        raise UsageError("the shielded disk must be a .vhdx file", str(out))
    kp_out = Path(kp_path) if kp_path else out.with_suffix(".kp")
    escrow_out = out.with_suffix(".recovery.p7m")
    vtpm_out = vtpm_state_path(out)
    if Path(template).resolve() == out.resolve():
        raise UsageError("the output must be a new file, not the template", str(out))
    if not owner.has_private_keys:
        raise UsageError(
            "the owner guardian's private keys are needed", hint="give the owner folder with its PFX files"
        )
    sub = _template_precheck(template, subformat)

    # The recovery password's 2^20-round key stretch starts now, in a forked child, so that it
    # overlaps the single-threaded checks below instead of competing with the disk pass.
    recovery = generate_recovery_password()
    rec_spec = ProtectorSpec("recovery_password", recovery).prepare()
    vt: _VtpmPlan | None = None
    try:
        # the VM's vTPM (manufactured with swtpm in the background while the checks and the disk
        # pass run, a software key, or an existing vTPM's parent); PCR input is checked first
        t3 = time.monotonic()
        vt = _plan_vtpm(vtpm, tpm_parent, vtpm_kind, pcrs, bank, pcr_values, tcg_log)
        timings["vtpm_start"] = time.monotonic() - t3
        # 1. PDK verified and opened by the owner; 2. template catalog and qualifier
        info, vsc, vsc_der, qual = _check_pdk_and_template(template, pdk_path, owner, trust)
        timings["checks"] = time.monotonic() - t0
        measurer = None
        if verify_content:
            # measured in the same pass that encrypts (tap), compared with the catalog at the end
            from ..catalog.measure import FREE_NTFS, Measurer
            from ..catalog.ntfs import ntfs_free_map

            doc = vsc.document
            with open_disk(template) as dev:
                view, _part = select_volume(dev, None)
                if view.size != doc.volume.size:
                    raise PolicyError(
                        f"the template volume ({view.size} bytes) differs from its catalog's ({doc.volume.size})",
                        str(template),
                    )
                fm = ntfs_free_map(view) if doc.free_space == FREE_NTFS else None
            measurer = Measurer(doc.volume.size, doc.block_size, fm)
        # 4. encrypt into a partial file beside the output
        partial = out.with_name(f".{out.name}.partial.vhdx")
        try:
            t1 = time.monotonic()
            taps: dict[str, Any] = {}
            if measurer is not None:
                if CHUNK % measurer.block_size == 0:  # hash in the encryption workers
                    taps = {"worker_tap": measurer.block_digests, "on_tap": measurer.accept_digests}
                else:
                    taps = {"tap": measurer.feed}
            enc = encrypt_disk(
                template,
                partial,
                None,
                method=method,
                protectors=[ProtectorSpec("tpm", seal=vt.seal), rec_spec],
                description=f"templatetool shielded VM ({vsc.name} {'.'.join(map(str, vsc.version))})",
                tap_zeros=measurer.feed_zeros if measurer else None,
                free_map=measurer.free_map if measurer else None,
                subformat=sub,
                **taps,
            )
            if measurer is not None:
                root, _leaves = measurer.finish()
                if root != vsc.document.root:
                    with open_disk(template) as dev:
                        view, _part = select_volume(dev, None)
                        _root, changed, files = compare_volume(view, vsc.document, name_files=True)
                    where = ", ".join(str(f.get("path", f)) for f in files[:5]) or f"{len(changed)} range(s)"
                    raise PolicyError(
                        "the template volume no longer matches its signed catalog",
                        str(template),
                        f"changed: {where}; re-protect the golden disk",
                    )
            timings["encrypt"] = time.monotonic() - t1
            timings["vtpm_wait"] = vt.finish().wait_s  # waited when the VMK was sealed
            timings["vtpm"] = timings["vtpm_start"] + timings["vtpm_wait"]  # (key kept: stable JSON)
            embed_vsc(partial, vsc_der)
            # 5. escrow, 6. KP
            escrow = owner_escrow(
                owner,
                {
                    "recovery_password": recovery,
                    "volume_guid": enc["result"].to_json().get("volume_guid"),
                    "disk": out.name,
                },
            )
            kp = create_kp(vt.secret(bank, info.policy).to_bytes(), owner, pdk_guardians(info, guardians))
            # the disk, its KP, its vTPM state and its escrow appear together or not at all (also on Ctrl-C)
            with atomic_outputs() as outs:
                outs.write(escrow_out, escrow, mode=0o600)
                if vt.made is not None:
                    outs.write(vtpm_out, vt.made.state, mode=0o600)
                outs.write(kp_out, kp)
                outs.adopt(partial, out)
        finally:
            with no_interrupts(), contextlib.suppress(OSError):
                partial.unlink()
        timings["total"] = time.monotonic() - t0
        res = enc["result"].to_json()  # public description: protector GUIDs, never the secrets
        return {
            "tool": f"templatetool {__version__}",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "template": {"path": str(template), **qual["template"]},
            "policy": info.policy,
            "outputs": {
                "disk": str(out),
                "kp": str(kp_out),
                "recovery_escrow": str(escrow_out),
                **({"vtpm_state": str(vtpm_out)} if vt.made is not None else {}),
            },
            "guardians": [g.name for g in info.guardians],
            "owner": info.owner.name,
            "vtpm": vt.to_json(bank),
            "bitlocker": {
                "partition": enc["partition"],
                "volume_offset": enc["volume_offset"],
                "volume_size": enc["volume_size"],
                "sparse_skipped_bytes": enc["skipped_bytes"],
                **res,
            },
            "catalog_verified": measurer is not None,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
    finally:
        rec_spec.discard()
        if vt is not None:
            vt.close()


@dataclass
class _VtpmPlan:
    """The VM's vTPM as shield makes it: ``kind`` swtpm (a manufactured vTPM: ``made``, made in
    the background from ``pending`` on, collected by :meth:`finish`), software (a storage key:
    ``key``) or existing (``--tpm-parent``); the parent the VMK is sealed under, the PCR values,
    the sealer and the reference boot (event digests per sealed PCR)."""

    kind: str
    parent: Any
    values: dict[int, bytes]
    sealer: Any
    key: Any = None
    made: Any = None
    reference_boot: dict[int, list[str]] = field(default_factory=dict)
    pending: Any = None
    bank: str = "sha256"
    #: seconds :meth:`finish` waited for the manufacture (shield's ``timings_s.vtpm_wait``)
    wait_s: float = 0.0

    def finish(self) -> _VtpmPlan:
        """Wait for a vTPM being manufactured; then ``made``, ``parent`` and ``sealer`` are set."""
        if self.pending is not None:
            from ..tpm import structs as ts
            from ..tpm.protector import make_sealer

            pending, self.pending = self.pending, None
            t = time.monotonic()
            try:
                self.made = pending.result()
            finally:
                pending.close()
            self.wait_s = time.monotonic() - t
            self.parent = self.made.srk
            self.sealer = make_sealer(
                self.parent, list(self.values), self.values, bank=self.bank, parent_handle=ts.SRK_HANDLE
            )
        return self

    def seal(self, vmk_key_entry: bytes) -> tuple[bytes, int]:
        """The TPM protector's sealer (BitLocker calls it once the disk pass is done)."""
        sealer: Any = self.finish().sealer
        return sealer(vmk_key_entry)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Abandon a manufacture still running (an error happened)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.close()

    def secret(self, bank: str, policy: str) -> VmSecret:
        """The KP's VM secret for this vTPM."""
        der = (
            self.key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if self.key is not None
            else None
        )
        state_key = self.made.key if self.made is not None else None
        digest = hashlib.sha256(self.made.state).hexdigest() if self.made is not None else None
        return VmSecret(
            der,
            self.parent.name.hex(),
            bank,
            sorted(self.values),
            policy,
            {k: v.hex() for k, v in self.values.items()},
            vtpm_state_key=state_key,
            vtpm_state_sha256=digest,
            reference_boot=self.reference_boot,
        )

    def to_json(self, bank: str) -> dict[str, Any]:
        """The report's public description (no key material)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "parent_name": self.parent.name.hex(),
            "generated": self.kind != "existing",
            "bank": bank,
            "pcrs": sorted(self.values),
        }
        if self.made is not None:
            out.update(
                srk_name=self.made.srk.name.hex(),
                ek_name=self.made.ek.name.hex(),
                state_sha256=hashlib.sha256(self.made.state).hexdigest(),
            )
        return out


def check_vtpm_mode(vtpm: str, tpm_parent: Any) -> None:
    """Refuse an unknown ``vtpm`` mode, and the swtpm mode without swtpm installed, before any work."""
    if vtpm not in VTPM_MODES:
        raise UsageError(f"unknown vTPM mode {vtpm!r}", hint="swtpm (a manufactured vTPM) or software (a vTPM key)")
    if tpm_parent is None and vtpm == "swtpm":
        from ..tpm.vtpm_manufacture import swtpm_missing

        missing = swtpm_missing()
        if missing is not None:
            raise ResourceError(
                f"{missing} is not installed: shield manufactures each VM's vTPM with swtpm",
                hint="install the Debian packages swtpm and swtpm-tools, or shield with "
                "a software vTPM key instead of a vTPM state",
                code="shield.no-swtpm",
            )


def _plan_vtpm(
    vtpm: str,
    tpm_parent: Any,
    vtpm_kind: str,
    pcrs: Sequence[int],
    bank: str,
    pcr_values: Mapping[int, bytes] | None,
    tcg_log: Any,
) -> _VtpmPlan:
    """Plan the VM's vTPM (PCR values resolved first, so bad input fails before swtpm runs); a
    manufactured one is started in the background: :meth:`_VtpmPlan.finish` waits for it."""
    from ..tpm.keys import generate_storage_key, load_parent, parse_parent_public, template_public
    from ..tpm.protector import make_sealer, resolve_pcr_values

    values = resolve_pcr_values(pcrs, bank, pcr_values=pcr_values, tcg_log=tcg_log)
    boot = (
        {pcr: [d.hex() for d in ds] for pcr, ds in boot_events(tcg_log, bank).items() if pcr in values}
        if tcg_log is not None
        else {}
    )
    if tpm_parent is not None:
        parent = load_parent(tpm_parent)
        return _VtpmPlan("existing", parent, values, make_sealer(parent, list(values), values, bank=bank))
    if vtpm == "software":
        key = generate_storage_key(vtpm_kind)
        parent = parse_parent_public(template_public(key.public_key(), "srk"), "new vTPM key")
        return _VtpmPlan(
            "software",
            parent,
            values,
            make_sealer(parent, list(values), values, bank=bank),
            key=key,
            reference_boot=boot,
        )
    from ..tpm.vtpm_manufacture import begin_manufacture

    # swtpm_setup (two RSA key generations, ~0.6 s) runs while the caller does the disk pass
    return _VtpmPlan(
        "swtpm", None, values, None, reference_boot=boot, pending=begin_manufacture(pcr_banks=bank), bank=bank
    )


def _template_precheck(template: Any, subformat: str | None) -> str:
    """A template whose OS volume is already BitLocker (a shielded VM disk) is refused up front.
    Returns the VM disk's VHDX subformat (``subformat``, else the template's)."""
    from ..disk import open_disk, output_subformat, select_volume, sniff_filesystem

    with open_disk(template) as dev:
        view, _part = select_volume(dev, None)
        if sniff_filesystem(view) == "bitlocker":
            raise UsageError(
                f"{Path(template).name} is already BitLocker-encrypted (a shielded VM disk?)",
                str(template),
                "shield the protected template disk the VM was made from",
            )
        return output_subformat(dev, subformat, "vhdx")


def _shield_in_place(
    template: Any,
    pdk_path: Any,
    owner: Guardian,
    *,
    kp_path: Any,
    tpm_parent: Any,
    pcrs: Sequence[int],
    pcr_values: Mapping[int, bytes] | None,
    tcg_log: Any,
    bank: str,
    method: str,
    vtpm_kind: str,
    verify_content: bool,
    trust: Any,
    guardians: Sequence[Guardian],
    vtpm: str,
    used_space_only: bool = False,
) -> dict[str, Any]:
    from ..bitlocker import ProtectorSpec, generate_recovery_password
    from ..bitlocker.inplace import in_place, probe
    from ..catalog.vsc import compare_volume
    from ..cms.enveloped import open_envelope
    from ..disk import open_disk, select_volume
    from ..kp import create_kp
    from .encrypt import sparse_skipper

    t0 = time.monotonic()
    disk = Path(template)
    kp_out = Path(kp_path) if kp_path else disk.with_suffix(".kp")
    escrow_out = disk.with_suffix(".recovery.p7m")
    vtpm_out = vtpm_state_path(disk)
    vt: _VtpmPlan | None = None
    info, vsc, _der, _qual = _check_pdk_and_template(template, pdk_path, owner, trust)
    with open_disk(template) as dev:
        view, _part = select_volume(dev, None)
        state = probe(view).state
        if state == "plain" and verify_content:
            _root, changed, files = compare_volume(view, vsc.document, name_files=True)
            if changed:
                where = ", ".join(str(f.get("path", f)) for f in files[:5]) or f"{len(changed)} range(s)"
                raise PolicyError(
                    "the template volume no longer matches its signed catalog",
                    str(template),
                    f"changed: {where}; re-protect the golden disk",
                )
    if state == "converting":  # resume a crashed run with the recovery password escrowed to the owner
        try:
            esc = json.loads(
                open_envelope(
                    escrow_out.read_bytes(), _owner_key(owner), owner.encryption_certificate, where=str(escrow_out)
                )
            )
        except FileNotFoundError:
            raise PolicyError(
                "the disk is mid-conversion but its recovery escrow is missing",
                str(escrow_out),
                "resume with `templatetool resume` and the recovery password",
            ) from None
        enc = in_place(template, None, credential={"recovery_password": esc["recovery_password"]})
        resumed = True
    elif state != "plain":
        raise UsageError(f"the template's OS volume is already {state}", str(template))
    else:
        resumed = False
        vt = _plan_vtpm(vtpm, tpm_parent, vtpm_kind, pcrs, bank, pcr_values, tcg_log).finish()
        plan = vt
        recovery = generate_recovery_password()
        secret = vt.secret(bank, info.policy)

        def save_keys(res: Any) -> None:  # before any sector of the template changes
            escrow = owner_escrow(
                owner, {"recovery_password": recovery, "volume_guid": res.volume_guid, "disk": disk.name}
            )
            kp = create_kp(secret.to_bytes(), owner, pdk_guardians(info, guardians))
            with atomic_outputs() as outs:  # escrow, vTPM state and KP together
                outs.write(escrow_out, escrow, mode=0o600)
                if plan.made is not None:
                    outs.write(vtpm_out, plan.made.state, mode=0o600)
                outs.write(kp_out, kp)

        enc = in_place(
            template,
            None,
            method=method,
            on_keys=save_keys,
            protectors=[ProtectorSpec("tpm", seal=vt.seal), ProtectorSpec("recovery_password", recovery)],
            description=f"templatetool shielded VM ({vsc.name} {'.'.join(map(str, vsc.version))})",
            free_space=sparse_skipper if used_space_only else None,
        )
    return {
        "tool": f"templatetool {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "in_place": True,
        "resumed": resumed,
        "template": {"path": str(template), "name": vsc.name, "version": ".".join(map(str, vsc.version))},
        "policy": info.policy,
        "outputs": {
            "disk": str(disk),
            "kp": str(kp_out),
            "recovery_escrow": str(escrow_out),
            **(
                {"vtpm_state": str(vtpm_out)}
                if (vt is not None and vt.made is not None) or (vt is None and vtpm_out.exists())
                else {}
            ),
        },
        "guardians": [g.name for g in info.guardians],
        "owner": info.owner.name,
        **({"vtpm": vt.to_json(bank)} if vt is not None else {}),
        "bitlocker": {
            "partition": enc["partition"],
            "volume_offset": enc["volume_offset"],
            "volume_size": enc["volume_size"],
            "skipped_bytes": enc["result"].skipped_bytes,
        },
        "catalog_verified": verify_content and not resumed,
        "timings_s": {"total": round(time.monotonic() - t0, 3)},
    }


__all__ = [
    "POLICIES",
    "VM_SECRET_FORMAT",
    "VTPM_MODES",
    "VmSecret",
    "boot_events",
    "check_vtpm_mode",
    "embed_vsc",
    "owner_escrow",
    "pdk_guardians",
    "shield",
    "vtpm_state_path",
]
