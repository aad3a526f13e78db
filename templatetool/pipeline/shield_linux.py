"""Shield a Linux template (made by ``protect --os linux``): re-key its LUKS2 root and seal the
new key in the VM's own vTPM as a ``systemd-tpm2`` token.

The template's root is LUKS2 under a passphrase its author knows, so everyone holding the
template knows its volume key: shield therefore **re-encrypts the whole data segment** under a
fresh volume key (old key → plaintext → new key, 1 MiB at a time, never the whole volume in
memory) into a new VHDX; the template is only read. The new header has two keyslots:

* 0: a **recovery key** (systemd-cryptenroll's format: 32 random bytes as 64 "modhex"
  characters in 8 dash-separated groups) escrowed to the owner (``VM.recovery.p7m``, CMS; its
  ``recovery_password`` field, ``kind`` ``luks2-recovery-key``: ``escrow open`` shows it);
* 1: the **systemd-tpm2 token**: a 256-bit secret sealed inside the VM's vTPM (manufactured
  with swtpm for this VM) under systemd 252's transient ECC primary with PolicyPCR over the
  chosen PCRs (default 7) at the values the reference boot gives (``tcg_log``) or
  ``pcr_values``; its base64 is the keyslot's passphrase, so the stock systemd-cryptsetup of the
  guest (``tpm2-device=auto``) unlocks it.

Before any of that: the PDK is verified and opened by the owner, the template's VSC qualifies
(signature, name, version rule), and the ESP — the boot chain the VM runs — is measured again
and must equal the catalog. The VM secret in the KP carries the vTPM state key K (vm-secret.md,
version 2), so ``host start`` is the same for Linux and Windows VMs. Outputs (disk, KP, vTPM
state, escrow) appear together or not at all. docs/formats/luks2.md has the field-by-field
description.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_outputs
from ..blockdev import BlockDevice, DeviceIO
from ..errors import FormatError, PolicyError, UnsupportedError, UsageError
from ..guardian.model import Guardian
from ..progress import progress
from ..secrets import Secret, resolve_secret

#: LUKS2 magic at the start of the root partition of a Linux template.
LUKS_MAGIC = b"LUKS\xba\xbe"
DEFAULT_PCRS = (7,)
_MODHEX = "cbdefghijklnrtuv"


def recovery_key() -> str:
    """A new recovery key in systemd-cryptenroll's format (256 bits, modhex, 8 groups of 8)."""
    raw = secrets.token_bytes(32)
    chars = "".join(_MODHEX[b >> 4] + _MODHEX[b & 15] for b in raw)
    return "-".join(chars[i : i + 8] for i in range(0, 64, 8))


def find_linux_root(dev: BlockDevice) -> tuple[Any, Any] | None:
    """(ESP, LUKS2 root partition) of a Linux template, or None when ``dev`` is not one."""
    from ..disk import read_partition_table
    from ..disk.partitions import EFI_SYSTEM as ESP_TYPE  # (not protect_linux: LUKS tooling)

    try:
        table = read_partition_table(dev)
    except FormatError:
        return None
    if table.scheme != "gpt":
        return None
    esps = [p for p in table.partitions if p.type_guid == ESP_TYPE]
    roots = [p for p in table.partitions if p.size > 4096 and p.view(dev).read(0, 6) == LUKS_MAGIC]
    if len(esps) != 1 or len(roots) != 1:
        return None
    return esps[0], roots[0]


def is_linux_template(template: str | os.PathLike[str]) -> bool:
    """True for a disk with one ESP and one LUKS2 partition (``protect --os linux`` output)."""
    from ..disk import open_disk

    with open_disk(template) as dev:
        return find_linux_root(dev) is not None


def shield_linux(
    template: str | os.PathLike[str],
    pdk_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    owner: Guardian,
    *,
    template_passphrase: Secret | None,
    kp_path: str | os.PathLike[str] | None = None,
    pcrs: Sequence[int] = DEFAULT_PCRS,
    pcr_values: Mapping[int, bytes] | None = None,
    tcg_log: str | os.PathLike[str] | bytes | None = None,
    bank: str = "sha256",
    trust: list[Any] | None = None,
    guardians: Sequence[Guardian] = (),
    subformat: str | None = None,
) -> dict[str, Any]:
    """Shield the Linux template ``template`` with the PDK at ``pdk_path`` (see the module doc);
    returns the JSON-ready report. ``template_passphrase``: a passphrase of one of the
    template's LUKS2 keyslots (the template author's)."""
    from ..bitlocker.cipher import XtsCipher
    from ..catalog.measure import FREE_NONE, measure_volume
    from ..disk import create_disk, open_disk, output_subformat
    from ..kp import create_kp
    from ..luks.metadata import read_header
    from ..luks.tpm2 import TOKEN_KDF, seal_token, token_passphrase
    from ..luks.volume import KEY_SIZE, KeyslotSpec, _segment_cipher, build_metadata_region, crypt_units, unlock
    from ..tpm.protector import resolve_pcr_values
    from ..tpm.vtpm_manufacture import manufacture_vtpm, start_vtpm
    from .protect import _copy_outside
    from .shield_common import (
        VmSecret,
        _check_pdk_and_template,
        boot_events,
        embed_vsc,
        owner_escrow,
        pdk_guardians,
        vtpm_state_path,
    )

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    out = Path(out_path)
    if not str(out).lower().endswith(".vhdx"):
        raise UsageError("the shielded disk must be a .vhdx file", str(out))
    if Path(template).resolve() == out.resolve():
        raise UsageError("the output must be a new file, not the template", str(out))
    kp_out = Path(kp_path) if kp_path else out.with_suffix(".kp")
    escrow_out = out.with_suffix(".recovery.p7m")
    vtpm_out = vtpm_state_path(out)
    values = resolve_pcr_values(list(pcrs), bank, pcr_values=pcr_values, tcg_log=tcg_log)
    boot = (
        {pcr: [d.hex() for d in ds] for pcr, ds in boot_events(tcg_log, bank).items() if pcr in values}
        if tcg_log is not None
        else {}
    )
    # 1. PDK verified and opened by the owner; the template's catalog qualifies
    info, vsc, vsc_der, qual = _check_pdk_and_template(template, pdk_path, owner, trust)
    doc = vsc.document
    with open_disk(template) as src:
        found = find_linux_root(src)
        if found is None:
            raise FormatError("not a Linux template (one ESP and one LUKS2 root partition)", str(template))
        esp, root = found
        # 2. the boot chain: the ESP must be the one the catalog signed
        if (esp.offset, esp.size) != (doc.volume.partition_offset, doc.volume.size):
            raise PolicyError(
                f"the catalog measures a {doc.volume.size}-byte volume at offset {doc.volume.partition_offset}, "
                f"the template's ESP is {esp.size} bytes at {esp.offset}",
                str(template),
                "re-protect the golden disk",
            )
        t1 = time.monotonic()
        m = measure_volume(esp.view(src), doc.block_size, free_space=FREE_NONE, desc="verifying ESP")
        if m.root != doc.root:
            raise PolicyError(
                "the template's ESP (its boot chain) no longer matches its signed catalog",
                str(template),
                "re-protect the golden disk",
            )
        timings["verify_esp"] = time.monotonic() - t1
        # 3. open the template's LUKS2 root with the author's passphrase
        view = root.view(src)
        hdr = read_header(DeviceIO(view), f"{template} partition {root.index}")  # type: ignore[arg-type]
        data_offset, ss = _segment_cipher(hdr)
        if hdr.segment.get("size") != "dynamic":
            raise UnsupportedError("a LUKS2 data segment of fixed size is not supported", str(template))
        passphrase = resolve_secret(template_passphrase)
        if not passphrase:
            raise UsageError(
                "the template's LUKS2 passphrase is needed to re-key its root",
                str(template),
                code="shield.template-passphrase",
            )
        _slot, old_key = unlock(hdr, DeviceIO(view), passphrase, f"{template} partition {root.index}")  # type: ignore[arg-type]
        data_size = root.size - data_offset
        if data_size <= 0 or data_size % ss:
            raise FormatError(f"the LUKS2 data segment ({data_size} bytes) is not whole sectors", str(template))
        sub = output_subformat(src, subformat, "vhdx")
        # 4. the VM's vTPM: manufactured, the token's secret sealed inside it
        t2 = time.monotonic()
        made = manufacture_vtpm(pcr_banks=bank)
        with start_vtpm(made.state, made.key) as sw:
            secret, token = seal_token(sw.tcti, sorted(values), bank, "ecc", dict(values))
        state = sw.final_state
        assert state is not None
        timings["vtpm"] = time.monotonic() - t2
        new_key = os.urandom(KEY_SIZE)
        recovery = recovery_key()
        luks_uuid = str(uuid.uuid4())
        region = build_metadata_region(
            new_key,
            [
                KeyslotSpec(recovery.encode(), TOKEN_KDF),  # 256 random bits: a slow KDF adds nothing
                KeyslotSpec(token_passphrase(secret), TOKEN_KDF, token=token, af_hash="sha512"),
            ],
            sector_size=ss,
            data_offset=data_offset,
            label=hdr.label,
            uuid=luks_uuid,
        )
        old, new = XtsCipher(old_key, ss), XtsCipher(new_key, ss)
        partial = out.with_name(f".{out.name}.partial.vhdx")
        t3 = time.monotonic()
        try:
            dst = create_disk(partial, src.size, like=src, fmt="vhdx", subformat=sub)
            try:
                with progress(src.size, "shielding Linux VM") as bar:
                    _copy_outside(src, dst, (root.offset, root.size), bar)
                    dst.write(root.offset, region)
                    bar.update(data_offset)
                    _rekey(view, dst, root.offset, data_offset, data_size, old, new, crypt_units, bar)
            finally:
                dst.close()
            timings["rekey"] = time.monotonic() - t3
            embed_vsc(partial, vsc_der)
            # 5. escrow, 6. KP (K + the state's hash), all outputs together
            escrow = owner_escrow(
                owner,
                {
                    "recovery_password": recovery,  # the name escrow readers know; here a LUKS2 recovery key
                    "kind": "luks2-recovery-key",
                    "disk": out.name,
                    "luks_partition": root.index,
                    "luks_uuid": luks_uuid,
                },
            )
            vm_secret = VmSecret(
                None,
                made.srk.name.hex(),
                bank,
                sorted(values),
                info.policy,
                {k: v.hex() for k, v in values.items()},
                vtpm_state_key=made.key,
                vtpm_state_sha256=hashlib.sha256(state).hexdigest(),
                reference_boot=boot,
            )
            kp = create_kp(vm_secret.to_bytes(), owner, pdk_guardians(info, guardians))
            with atomic_outputs() as outs:
                outs.write(escrow_out, escrow, mode=0o600)
                outs.write(vtpm_out, state, mode=0o600)
                outs.write(kp_out, kp)
                outs.adopt(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    timings["total"] = time.monotonic() - t0
    return {
        "tool": f"templatetool {__version__}",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "os": "linux",
        "template": {"path": str(template), **qual["template"]},
        "policy": info.policy,
        "outputs": {
            "disk": str(out),
            "kp": str(kp_out),
            "recovery_escrow": str(escrow_out),
            "vtpm_state": str(vtpm_out),
        },
        "guardians": [g.name for g in info.guardians],
        "owner": info.owner.name,
        "vtpm": {
            "kind": "swtpm",
            "srk_name": made.srk.name.hex(),
            "ek_name": made.ek.name.hex(),
            "state_sha256": hashlib.sha256(state).hexdigest(),
            "bank": bank,
            "pcrs": sorted(values),
        },
        "luks": {
            "partition": root.index,
            "uuid": luks_uuid,
            "offset": root.offset,
            "data_offset": data_offset,
            "data_size": data_size,
            "sector_size": ss,
            "keyslots": {"0": "recovery key (escrowed)", "1": "systemd-tpm2 token (the VM's vTPM)"},
            "token": {k: v for k, v in token.items() if k not in ("tpm2-blob", "keyslots")},
        },
        "catalog_verified": True,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _rekey(
    view: BlockDevice,
    dst: BlockDevice,
    part_offset: int,
    data_offset: int,
    size: int,
    old: Any,
    new: Any,
    crypt_units: Any,
    bar: Any,
    chunk: int = 1 << 20,
) -> None:
    """Old ciphertext → plaintext → new ciphertext, ``chunk`` bytes at a time (one buffer)."""
    buf = bytearray(chunk + 16)
    mv = memoryview(buf)
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        data = view.read(data_offset + pos, n)
        if len(data) != n:
            raise FormatError("short read in the template's LUKS2 data segment")
        mv[:n] = data
        crypt_units(old, mv, n, pos, False)
        crypt_units(new, mv, n, pos, True)
        dst.write(part_offset + data_offset + pos, bytes(mv[:n]))
        pos += n
        bar.update(n)


__all__ = ["DEFAULT_PCRS", "find_linux_root", "is_linux_template", "recovery_key", "shield_linux"]
