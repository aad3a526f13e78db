"""What every shield shares (BitLocker and Linux VMs): the VM secret the KP carries, the PDK and
template checks, the PDK's guardians, the reference boot, the catalog copied into the VM disk and
the owner's escrow. ``pipeline/shield.py`` re-exports the public names."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..canonical import canonical_json
from ..errors import FormatError, PolicyError, UsageError
from ..guardian.model import Guardian, guardian_from_certificates

#: The VM secret carried by the KP (docs/formats/vm-secret.md).
VM_SECRET_FORMAT = "templatetool-vm-secret"
POLICIES = ("shielded", "encryption-supported")


@dataclass
class VmSecret:
    """What the KP releases (docs/formats/vm-secret.md): the vTPM's keys and the seal parameters.

    Version 2 (written by shield): ``vtpm_state_key`` is the 32-byte key K that decrypts the VM's
    swtpm state ``VM.vtpm`` and ``vtpm_state_sha256`` that file's hash (both None without a
    manufactured vTPM); ``reference_boot`` the event digests per sealed PCR of the reference TCG
    log (what a dry run plays into the vTPM). ``vtpm_key_der`` is the software vTPM storage key
    (``--vtpm software``; None otherwise). Version 1 secrets (no state) still parse.
    """

    vtpm_key_der: bytes | None = field(repr=False)
    parent_name: str
    bank: str
    pcrs: list[int]
    policy: str
    pcr_values: dict[int, str] = field(default_factory=dict)
    vtpm_state_key: bytes | None = field(default=None, repr=False)
    vtpm_state_sha256: str | None = None
    reference_boot: dict[int, list[str]] = field(default_factory=dict)
    version: int = 2

    def to_bytes(self) -> bytes:
        """The canonical JSON document (version 2 unless this secret was read as version 1)."""
        doc: dict[str, Any] = {
            "format": VM_SECRET_FORMAT,
            "version": self.version,
            "vtpm_key": base64.b64encode(self.vtpm_key_der).decode() if self.vtpm_key_der else None,
            "parent_name": self.parent_name,
            "bank": self.bank,
            "pcrs": self.pcrs,
            "policy": self.policy,
            "pcr_values": {str(k): v for k, v in sorted(self.pcr_values.items())},
        }
        if self.version >= 2:
            doc["vtpm_state_key"] = base64.b64encode(self.vtpm_state_key).decode() if self.vtpm_state_key else None
            doc["vtpm_state_sha256"] = self.vtpm_state_sha256
            doc["reference_boot"] = {str(k): list(v) for k, v in sorted(self.reference_boot.items())}
        return canonical_json(doc)

    @classmethod
    def from_bytes(cls, data: bytes) -> VmSecret:
        """Parse a version 1 or 2 VM secret (FormatError for anything else)."""
        try:
            d = json.loads(data)
            version = d.get("format") == VM_SECRET_FORMAT and d.get("version")
            if version not in (1, 2) or isinstance(version, bool):
                raise ValueError("format")
            key = base64.b64decode(d["vtpm_key"], validate=True) if d.get("vtpm_key") else None
            sec = cls(
                key,
                str(d["parent_name"]),
                str(d["bank"]),
                [int(x) for x in d["pcrs"]],
                str(d["policy"]),
                {int(k): str(v) for k, v in d.get("pcr_values", {}).items()},
                version=int(version),
            )
            if version == 2:
                if d.get("vtpm_state_key") is not None:
                    k = base64.b64decode(d["vtpm_state_key"], validate=True)
                    digest = d.get("vtpm_state_sha256")
                    if len(k) != 32 or not isinstance(digest, str) or len(bytes.fromhex(digest)) != 32:
                        raise ValueError("state key")
                    sec.vtpm_state_key, sec.vtpm_state_sha256 = k, digest.lower()
                sec.reference_boot = {
                    int(p): [bytes.fromhex(x).hex() for x in v] for p, v in (d.get("reference_boot") or {}).items()
                }
            return sec
        except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            raise FormatError("the key protector's secret is not a templatetool VM secret") from None

    @property
    def has_vtpm_state(self) -> bool:
        """True when the VM has a manufactured vTPM (``VM.vtpm`` + K)."""
        return self.vtpm_state_key is not None

    def private_key(self) -> Any:
        """The software vTPM storage private key object (or None)."""
        if self.vtpm_key_der is None:
            return None
        return serialization.load_der_private_key(self.vtpm_key_der, None)


def vtpm_state_path(vm_disk: str | os.PathLike[str]) -> Path:
    """Where a VM's encrypted vTPM state lives: ``VM.vtpm`` beside ``VM.vhdx``."""
    return Path(vm_disk).with_suffix(".vtpm")


def pdk_guardians(info: Any, known: Sequence[Guardian] = ()) -> list[Guardian]:
    """Guardian objects for the guardians a PDK names.

    A guardian given in ``known`` (a folder or imported HGS metadata) with the same certificates
    is used as is: it carries the encryption-certificate signature a KP wrapping needs.
    """
    der = serialization.Encoding.DER
    out = []
    for e in info.guardians:
        ids = (e.signing_certificate.public_bytes(der), e.encryption_certificate.public_bytes(der))
        match = [
            k
            for k in known
            if (k.signing_certificate.public_bytes(der), k.encryption_certificate.public_bytes(der)) == ids
        ]
        if match:
            out.append(match[0])
            continue
        g = guardian_from_certificates(e.name, e.signing_certificate, e.encryption_certificate)
        sig = getattr(e, "encryption_signature", None)
        if sig is not None:
            g.encryption_signature = sig
        out.append(g)
    return out


def _owner_key(owner: Guardian) -> Any:
    """The owner's encryption private key (UsageError when the guardian was loaded without keys)."""
    if owner.encryption_key is None:
        raise UsageError(
            "the owner guardian's private keys are needed", hint="give the owner folder with its PFX files"
        )
    return owner.encryption_key


def _pin_owner(info: Any, owner: Guardian) -> None:
    der = serialization.Encoding.DER
    if info.owner.signing_certificate.public_bytes(der) != owner.signing_certificate.public_bytes(der):
        raise PolicyError("the PDK belongs to another owner", hint="give the owner guardian that created the PDK")


def boot_events(tcg_log: str | os.PathLike[str] | bytes, bank: str) -> dict[int, list[bytes]]:
    """A TCG log's event digests in ``bank``, per PCR in log order (what a boot extends)."""
    from ..tpm import structs as ts
    from ..tpm.algs import bank_id
    from ..tpm.eventlog import parse_log, read_log

    data = bytes(tcg_log) if isinstance(tcg_log, (bytes, bytearray)) else read_log(tcg_log)
    alg = bank_id(bank)
    out: dict[int, list[bytes]] = {}
    for ev in parse_log(data, str(tcg_log) if not isinstance(tcg_log, (bytes, bytearray)) else "event log").events:
        if ev.type != ts.EV_NO_ACTION and alg in ev.digests:
            out.setdefault(ev.pcr, []).append(ev.digests[alg])
    return out


def embed_vsc(vhdx_path: str | os.PathLike[str], vsc_der: bytes) -> None:
    """Put the template's signed catalog into a VM disk's VHDX user metadata (what unlock verifies)."""
    from ..catalog import VSC_METADATA_GUID
    from ..vhdx import open_vhdx

    disk = open_vhdx(vhdx_path, writable=True)
    try:
        disk.set_user_metadata(VSC_METADATA_GUID, vsc_der, virtual_disk=True)
    finally:
        disk.close()


def owner_escrow(owner: Guardian, doc: dict[str, Any]) -> bytes:
    """The recovery escrow: canonical JSON ``doc`` enveloped (CMS AuthEnvelopedData) to the owner only."""
    from ..cms.enveloped import envelope

    return envelope(canonical_json(doc), [owner.encryption_certificate])


def _check_pdk_and_template(
    template: Any, pdk_path: Any, owner: Guardian, trust: Any
) -> tuple[Any, Any, bytes, dict[str, Any]]:
    """PDK verified and opened by the owner; template catalog qualifies.

    Returns (pdk info, vsc, vsc DER, qualifier result)."""
    from ..catalog.vsc import open_vsc, read_vsc_bytes
    from ..errors import NotFoundError
    from ..pdk.shielding import check_template, open_pdk_secret, read_pdk

    if not owner.has_private_keys:
        raise UsageError(
            "the owner guardian's private keys are needed", hint="give the owner folder with its PFX files"
        )
    try:
        pdk_der = Path(pdk_path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError("PDK not found", str(pdk_path)) from None
    info = read_pdk(pdk_der, str(pdk_path), owner_certificate=owner.signing_certificate)
    _pin_owner(info, owner)
    open_pdk_secret(info, _owner_key(owner), owner.encryption_certificate, str(pdk_path))
    if info.policy not in POLICIES:
        raise FormatError(f"unknown PDK policy {info.policy!r}", str(pdk_path))
    vsc_der = read_vsc_bytes(template)
    qual = check_template(info, vsc_der, str(template), trust=trust)
    if not qual["qualified"]:
        raise PolicyError(
            f"the template does not satisfy the PDK: {qual['reason']}",
            str(template),
            "use a template the PDK's volume ID qualifiers accept, or a PDK made for this template",
        )
    return info, open_vsc(vsc_der, trust=trust), vsc_der, qual


__all__ = [
    "POLICIES",
    "VM_SECRET_FORMAT",
    "VmSecret",
    "boot_events",
    "embed_vsc",
    "owner_escrow",
    "pdk_guardians",
    "vtpm_state_path",
]
