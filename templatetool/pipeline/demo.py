"""`templatetool demo`: the whole offline pipeline on a golden disk with throwaway identities.

template author: protect (reserve BitLocker regions, measure, sign) → export .vsc
tenant:          owner + fabric guardian → PDK (qualifier on the template) → shield → VM.vhdx + VM.kp
guardian:        attestation policy + a host → dry run → unlock (decrypt) → catalog verified
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..atomic import write_bytes_atomic

#: PCRs a Hyper-V Gen2 shielded VM's BitLocker uses (Secure Boot policy + BitLocker access control).
DEMO_PCRS = (7, 11)


def demo_tcg_log() -> bytes:
    """A reference TCG log for the demo VM (Secure Boot state in PCR 7, boot manager in 4, BitLocker in 11)."""
    from ..tpm.eventlog import write_agile_log

    ev = []
    for pcr, typ, data in (
        (0, 0x80000008, b"Hyper-V UEFI Release v4.1"),
        (7, 0x800000E0, b"SecureBoot=1 PK KEK db dbx"),
        (4, 0x80000003, b"\\EFI\\Microsoft\\Boot\\bootmgfw.efi"),
        (11, 0x0000000D, b"BitLocker"),
    ):
        ev.append((pcr, typ, {0x0004: hashlib.sha1(data).digest(), 0x000B: hashlib.sha256(data).digest()}, data))
    return write_agile_log(ev)


def run_demo(
    golden: str | os.PathLike[str], out_dir: str | os.PathLike[str], say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the pipeline in ``out_dir``; returns a report with artifacts and timings."""
    from ..catalog.qualifier import VolumeIdQualifier
    from ..catalog.vsc import open_vsc, read_vsc_bytes
    from ..guardian.model import generate_guardian, load_guardian, save_guardian
    from ..hgs import AttestationPolicy, init_attestation, new_host
    from ..hgs.host import pem_public
    from ..pdk.document import NamedFile, SecretPart
    from ..pdk.shielding import create_pdk
    from ..signers.certs import new_key, self_signed
    from ..signers.files import PemSigner
    from .protect import protect
    from .shield import shield
    from .unlock import unlock

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def step(name: str) -> Callable[[], None]:
        t = time.monotonic()
        say(f"\n== {name}")

        def done() -> None:
            timings[name] = round(time.monotonic() - t, 3)

        return done

    done = step("identities: template signer, owner guardian, fabric guardian (HGS), guarded host")
    key = new_key("rsa3072")
    cert = self_signed("CN=Contoso Template Signing", key, "signing")
    write_bytes_atomic(
        d / "signer.key.pem",
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        mode=0o600,
    )
    write_bytes_atomic(d / "signer.pem", cert.public_bytes(serialization.Encoding.PEM))
    signer = PemSigner(str(d / "signer.key.pem"), str(d / "signer.pem"))
    save_guardian(generate_guardian("Owner", "ec-p256"), d / "owner", None, overwrite=True)
    save_guardian(generate_guardian("Fabric HGS", "rsa3072"), d / "fabric", None, overwrite=True)
    init_attestation(d / "fabric")
    host = new_host("hyperv-host-01", d / "host")
    pol = AttestationPolicy.load(d / "fabric")
    pol.add_host_key(host.name, pem_public(host.host_key.public_key()))
    pol.save(d / "fabric")
    say(f"  signer {cert.subject.rfc4514_string()}; guardians in {d / 'owner'}, {d / 'fabric'}; host {host.name}")
    done()

    done = step("template author: protect the golden disk (reserve BitLocker regions, measure, sign)")
    pr = protect(golden, d / "template.vhdx", "WindowsServer2025-Datacenter", "10.0.26100.1", signer, overwrite=True)
    vsc_der = read_vsc_bytes(d / "template.vhdx")
    write_bytes_atomic(d / "template.vsc", vsc_der)
    say(
        f"  template.vhdx: catalog root {pr.document.root.hex()[:32]}..., {pr.document.block_count} blocks; template.vsc exported"
    )
    done()

    done = step("tenant: shielding data (PDK) for that template, owner + fabric guardian")
    owner = load_guardian(d / "owner", private=True)
    fabric = load_guardian(d / "fabric")
    vi = open_vsc(vsc_der)
    q = VolumeIdQualifier.from_vsc(vi, "ge")
    secret = SecretPart(
        answer_file=NamedFile(
            "unattend.xml",
            b'<?xml version="1.0"?><unattend xmlns="urn:schemas-microsoft-com:unattend"><!-- @ComputerName@ --></unattend>',
        ),
        specialization_values={"@ComputerName@": "vm01"},
    )
    pdk, _warn = create_pdk(owner, [fabric], [q], secret, "shielded", allow_untrusted_root=True)
    write_bytes_atomic(d / "tenant.pdk", pdk)
    say(f"  tenant.pdk: qualifier {q.name} >= {'.'.join(map(str, q.version))}, guardians: {fabric.name}")
    done()

    done = step("tenant: shield the template (BitLocker XTS-AES-128, vTPM protector on PCR 7,11, recovery escrow)")
    log = demo_tcg_log()
    write_bytes_atomic(d / "vm-reference.tcglog", log)
    rep = shield(
        d / "template.vhdx", d / "tenant.pdk", d / "vm.vhdx", owner, tcg_log=log, pcrs=DEMO_PCRS, guardians=[fabric]
    )
    say(
        "  vm.vhdx + vm.kp + vm.recovery.p7m + vm.vtpm (the VM's swtpm vTPM); protectors: "
        + ", ".join(p["type"] for p in rep["bitlocker"]["protectors"])
    )
    done()

    done = step("guardian dry run: will the fabric unlock this VM?")
    dry = unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", d / "host", dry_run=True)
    for s in dry.steps:
        say(f"  {s.status:>7}  {s.name}: {s.detail}")
    done()

    done = step("guardian: unlock and decrypt the VM disk, verify the catalog on the result")
    real = unlock(d / "vm.vhdx", d / "vm.kp", d / "fabric", d / "host", output=d / "vm-decrypted.vhdx")
    say(f"  {'ok' if real.ok else 'FAILED'}: {real.steps[-1].detail}")
    done()
    say("\ntimings (s): " + ", ".join(f"{k.split(':')[0]} {v}" for k, v in timings.items()))
    return {
        "ok": dry.ok and real.ok,
        "out_dir": str(d),
        "timings_s": timings,
        "shield": rep,
        "dry_run": dry.to_json(),
        "unlock": real.to_json(),
    }


__all__ = ["DEMO_PCRS", "demo_tcg_log", "run_demo"]
