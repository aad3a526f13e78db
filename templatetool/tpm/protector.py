"""Our offline-sealed vTPM key protector: payload layout, sealer for BitLocker, and unsealers.

The payload (``VTPM_PROTECTOR`` in structs.py, spec in docs/formats/vtpm-protector.md) carries a
TPM2_Import blob of a sealed-data object holding the 44-byte BitLocker VMK KEY entry, the policy
(PolicyPCR over a PCR selection [+ PolicyAuthValue for a PIN]) and the parent's Name. It is not
the Windows-native TPM protector (that needs a TPM-internal private blob that cannot be made
offline); a guest converts it to a native one on first boot.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError

from ..errors import CredentialError, FormatError, PolicyError, UnsupportedError, UsageError
from . import structs as s
from .algs import bank_id, bank_name, check_pcrs, digest_size, hash_bytes, pcr_mask, pcrs_from_bitmap
from .duplicate import SealedBlob, seal_offline, unwrap
from .keys import (
    ParentKey,
    PrivateKey,
    load_parent,
    load_private_key,
    object_name,
    parse_parent_public,
    template_public,
)
from .policy import COMMAND_NAMES, Policy, compute_policy

FLAG_PIN = 0x0001

#: What the BitLocker writer calls: seal(vmk_key_entry) -> (TPM_ENCODED payload, PCR bitmap).
Sealer = Callable[[bytes], tuple[bytes, int]]


def pin_auth_value(pin: str) -> bytes:
    """The sealed object's authValue for a PIN: SHA-256(UTF-8 PIN) without trailing zero bytes
    (the TPM ignores trailing zeros of an authValue; trimming keeps both sides identical)."""
    if not pin:
        raise UsageError("empty PIN")
    return hash_bytes("sha256", pin.encode("utf-8")).rstrip(b"\0")


@dataclass(frozen=True)
class VtpmProtector:
    """A parsed vTPM protector payload."""

    version: int
    flags: int
    parent_handle: int
    parent_name: bytes
    commands: tuple[int, ...]
    bank: int
    pcrs: tuple[int, ...]
    selection: bytes  # marshalled TPML_PCR_SELECTION
    pcr_digest: bytes
    blob: SealedBlob
    auth_policy: bytes = field(default=b"")

    @property
    def has_pin(self) -> bool:
        return bool(self.flags & FLAG_PIN)

    @property
    def pcr_mask(self) -> int:
        return pcr_mask(self.pcrs)

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "pin": self.has_pin,
            "parent_handle": f"0x{self.parent_handle:08x}",
            "parent_name": self.parent_name.hex(),
            "policy": [COMMAND_NAMES.get(c, hex(c)) for c in self.commands],
            "bank": bank_name(self.bank),
            "pcrs": list(self.pcrs),
            "pcr_digest": self.pcr_digest.hex(),
            "auth_policy": self.auth_policy.hex(),
            "object_name": self.blob.name.hex(),
        }


def build_protector(
    parent: ParentKey, policy: Policy, blob: SealedBlob, *, pin: bool, parent_handle: int | None = None
) -> bytes:
    """Marshal a version-1 protector payload. ``parent_handle`` defaults to the standard
    persistent handle: 0x81000001 (SRK) or 0x81010001 (EK-style parents)."""
    if parent_handle is None:
        parent_handle = s.EK_HANDLE if parent.is_ek_style else s.SRK_HANDLE
    out: bytes = s.VTPM_PROTECTOR.build(
        {
            "version": s.PROTECTOR_VERSION,
            "flags": FLAG_PIN if pin else 0,
            "parentHandle": parent_handle,
            "parentName": parent.name,
            "policy": list(policy.commands),
            "pcrSelection": s.TPML_PCR_SELECTION.parse(policy.selection),
            "pcrDigest": policy.pcr_digest,
            "duplicate": blob.duplicate,
            "public": blob.public,
            "inSymSeed": blob.in_sym_seed,
        }
    )
    return out


def parse_protector(payload: bytes, where: str = "vTPM protector") -> VtpmProtector:
    """Parse and sanity-check a protector payload (FormatError/UnsupportedError on bad input)."""
    if not payload.startswith(s.PROTECTOR_MAGIC):
        raise FormatError(
            "not a templatetool vTPM protector (bad magic)",
            where,
            "a Windows-native TPM protector can only be used by Windows itself",
        )
    if len(payload) >= 8 and int.from_bytes(payload[6:8], "big") != s.PROTECTOR_VERSION:
        raise UnsupportedError(f"vTPM protector version {int.from_bytes(payload[6:8], 'big')} is not supported", where)
    try:
        p = s.VTPM_PROTECTOR.parse(payload)
        pub = s.TPMT_PUBLIC.parse(p.public)
    except ConstructError as e:
        raise FormatError(f"malformed vTPM protector: {str(e).splitlines()[0][:120]}", where) from None
    if len(p.pcrSelection) != 1:
        raise UnsupportedError("vTPM protector with more than one PCR bank", where)
    sel = p.pcrSelection[0]
    if pub.type != s.ALG_KEYEDHASH or pub.objectAttributes & s.ATTR_USER_WITH_AUTH:
        raise FormatError("sealed object is not a policy-only sealed-data object", where)
    for cc in p.policy:
        if cc not in COMMAND_NAMES:
            raise UnsupportedError(f"policy command 0x{cc:x} is not supported", where)
    if s.CC_POLICY_PCR not in p.policy:
        raise FormatError("protector policy has no PolicyPCR", where)
    try:
        digest_size(sel.hash)
    except Exception:
        raise UnsupportedError(f"PCR bank 0x{sel.hash:04x} is not supported", where) from None
    return VtpmProtector(
        p.version,
        p.flags,
        p.parentHandle,
        bytes(p.parentName),
        tuple(p.policy),
        sel.hash,
        tuple(pcrs_from_bitmap(bytes(sel.pcrSelect))),
        s.TPML_PCR_SELECTION.build(p.pcrSelection),
        bytes(p.pcrDigest),
        SealedBlob(bytes(p.public), bytes(p.duplicate), bytes(p.inSymSeed)),
        bytes(pub.authPolicy),
    )


def resolve_pcr_values(
    pcrs: Sequence[int] | None,
    bank: int | str = "sha256",
    *,
    pcr_values: Mapping[int, bytes] | None = None,
    tcg_log: str | os.PathLike[str] | bytes | None = None,
) -> dict[int, bytes]:
    """The PCR values to seal to: given explicitly, or replayed from a TCG event log."""
    if (pcr_values is None) == (tcg_log is None):
        raise UsageError("give either PCR values or a TCG event log", hint="one of the two", code="tpm.pcr-source")
    bank_name(bank_id(bank))  # an unknown bank is a UsageError here, before any lookup
    if pcrs:
        pcrs = check_pcrs(pcrs)  # 0..23: an index past the PCR file is a UsageError, never a KeyError
    if tcg_log is not None:
        from .eventlog import replay_log

        banks = replay_log(tcg_log)
        name = bank_name(bank_id(bank))
        if name not in banks.values_by_bank:
            raise UsageError(
                f"the event log has no {name} bank", hint=f"banks in the log: {', '.join(banks.values_by_bank)}"
            )
        if not pcrs:
            raise UsageError(
                "give --pcrs with --tcg-log",
                hint="give the PCR indices to replay, e.g. 7 and 11",
                code="tpm.pcrs-with-log",
            )
        return {i: banks.values_by_bank[name][i] for i in pcrs}
    vals = dict(pcr_values or {})
    if pcrs:
        missing = [i for i in pcrs if i not in vals]
        if missing:
            raise UsageError(f"no value given for PCR {', '.join(map(str, missing))}")
        vals = {i: vals[i] for i in pcrs}
    return vals


def seal_to_parent(
    parent: ParentKey,
    secret: bytes,
    bank: int | str,
    pcr_values: Mapping[int, bytes],
    *,
    pin: str | None = None,
    parent_handle: int | None = None,
) -> bytes:
    """Seal ``secret`` to ``parent`` under PolicyPCR(pcr_values) [+ PolicyAuthValue(pin)]; return the payload."""
    policy = compute_policy(bank, pcr_values, auth_value=pin is not None)
    blob = seal_offline(parent, secret, policy.digest, pin_auth_value(pin) if pin is not None else b"")
    return build_protector(parent, policy, blob, pin=pin is not None, parent_handle=parent_handle)


def make_sealer(
    parent: ParentKey | str | os.PathLike[str],
    pcrs: Sequence[int] | None = None,
    pcr_values: Mapping[int, bytes] | None = None,
    *,
    tcg_log: str | os.PathLike[str] | bytes | None = None,
    bank: str = "sha256",
    pin: str | None = None,
    parent_handle: int | None = None,
) -> Sealer:
    """A BitLocker TPM protector sealer: ``seal(vmk_key_entry) -> (payload, pcr_bitmap)``.

    Everything (parent, PCR values or log replay, policy) is resolved now, so errors surface
    before any disk is touched. ``pcr_bitmap`` has bit i set for PCR i (BitLocker's u32).
    """
    if not isinstance(parent, ParentKey):
        parent = load_parent(parent)
    values = resolve_pcr_values(pcrs, bank, pcr_values=pcr_values, tcg_log=tcg_log)
    compute_policy(bank, values, auth_value=pin is not None)  # validate sizes now
    mask = pcr_mask(values)

    def seal(vmk_key_entry: bytes) -> tuple[bytes, int]:
        return seal_to_parent(parent, bytes(vmk_key_entry), bank, values, pin=pin, parent_handle=parent_handle), mask

    return seal


def _parent_for_key(prot: VtpmProtector, key: PrivateKey, parent: ParentKey | None) -> ParentKey:
    candidates = [parent] if parent is not None else []
    for kind in ("srk", "ek"):
        with contextlib.suppress(Exception):  # unsupported curve etc.: no candidate
            candidates.append(parse_parent_public(template_public(key.public_key(), kind)))
    for c in candidates:
        if c.name == prot.parent_name:
            return c
    raise CredentialError(
        "the private key does not belong to the protector's parent",
        hint=f"the protector is sealed to parent Name {prot.parent_name.hex()[:20]}...",
    )


def unseal_with_software_key(
    payload: bytes | VtpmProtector,
    parent_private_key: PrivateKey | str | os.PathLike[str],
    pcr_values: Mapping[int, bytes],
    pin: str | None = None,
    *,
    parent: ParentKey | None = None,
) -> bytes:
    """Unseal in software with the vTPM storage private key, enforcing the same checks a TPM
    would: the outer HMAC and binding, the PCR policy against ``pcr_values``, and the PIN."""
    prot = payload if isinstance(payload, VtpmProtector) else parse_protector(payload)
    key = (
        parent_private_key
        if not isinstance(parent_private_key, (str, os.PathLike))
        else load_private_key(parent_private_key)
    )
    par = _parent_for_key(prot, key, parent)
    sens = unwrap(par, key, prot.blob.public, prot.blob.duplicate, prot.blob.in_sym_seed)
    missing = [i for i in prot.pcrs if i not in pcr_values]
    if missing:
        raise UsageError(
            f"no value for PCR {', '.join(map(str, missing))}",
            hint="the protector is sealed to PCRs " + ",".join(map(str, prot.pcrs)),
        )
    pol = compute_policy(prot.bank, {i: pcr_values[i] for i in prot.pcrs}, commands=prot.commands)
    if pol.digest != prot.auth_policy:
        raise PolicyError(
            "PCR values do not satisfy the sealed policy",
            hint=f"{bank_name(prot.bank)} PCRs {','.join(map(str, prot.pcrs))} differ from the sealed values",
        )
    expected_auth = bytes(sens.authValue)
    if s.CC_POLICY_AUTH_VALUE in prot.commands:
        if pin is None:
            raise CredentialError("this protector needs a PIN", hint="give the PIN", code="tpm.pin-needed")
        if pin_auth_value(pin) != expected_auth:
            raise CredentialError("wrong PIN")
    return bytes(sens.sensitive)


def unseal_with_tpm(
    payload: bytes | VtpmProtector, tcti: str, *, pin: str | None = None, parent_handle: int | None = None, **kw: Any
) -> bytes:
    """Import, load and unseal through a real (v)TPM (tpm2-pytss ESAPI over ``tcti``, e.g.
    ``swtpm:host=127.0.0.1,port=2321``). The TPM enforces the PCR policy and the PIN."""
    from .tpmclient import unseal_protector

    prot = payload if isinstance(payload, VtpmProtector) else parse_protector(payload)
    return unseal_protector(
        prot, tcti, pin_auth=pin_auth_value(pin) if pin is not None else None, parent_handle=parent_handle, **kw
    )


__all__ = [
    "Sealer",
    "VtpmProtector",
    "build_protector",
    "make_sealer",
    "object_name",
    "parse_protector",
    "pin_auth_value",
    "resolve_pcr_values",
    "seal_to_parent",
    "unseal_first_with_tpm",
    "unseal_with_software_key",
    "unseal_with_tpm",
]


def unseal_first_with_tpm(
    payloads: Sequence[bytes], tcti: str, *, pin: str | None = None, parent_handle: int | None = None, esys: Any = None
) -> bytes:
    """Try each TPM_ENCODED payload (after BitLocker's u32 PcrBitmap) in turn through the TPM;
    return the first unsealed secret (the 44-byte VMK KEY entry). Payloads in another format
    (e.g. Windows-native) are skipped; if none unseals, the last error is raised."""
    last: Exception | None = None
    for payload in payloads:
        try:
            prot = parse_protector(bytes(payload))
        except (FormatError, UnsupportedError) as e:
            last = e
            continue
        try:
            return unseal_with_tpm(prot, tcti, pin=pin, parent_handle=parent_handle, esys=esys)
        except (PolicyError, CredentialError) as e:
            last = e
        except Exception as e:
            from ..errors import TemplateToolError

            if not isinstance(e, TemplateToolError):
                raise
            last = e
    if last is None:
        raise CredentialError("the volume has no vTPM protector")
    raise last
