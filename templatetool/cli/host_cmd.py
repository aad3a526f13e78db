"""`templatetool host ...`: the guarded host (identity, evidence, `attest` to a fabric, `start` a VM)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import click

from ..atomic import write_bytes_atomic
from ..errors import UsageError
from ..hgs import create_evidence, load_host, new_host
from ..host.health import DEFAULT_REFRESH_MARGIN, parse_duration
from ..host.launch import ACCELS, CONSOLES
from .common import emit, json_option, read_small_file
from .policy import KEY_FOLDER, OUTPUT_FILE

#: Evidence, keys and TCG logs we read are small; refuse anything larger before reading it.
MAX_INPUT = 64 << 20
#: Where Linux exposes the host's measured-boot log.
SYSFS_TCG_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"


def _read(path: str, limit: int = MAX_INPUT) -> bytes:
    return read_small_file(path, "file", limit)


def _margin(text: str) -> _dt.timedelta:
    return parse_duration(text)


def _tpm_args(tpm: str | None, tcg_log: str | None) -> bytes | None:
    if tpm is None:
        if tcg_log:
            raise UsageError("--tcg-log needs --tpm")
        return None
    return _read(tcg_log or SYSFS_TCG_LOG)


def _verify(ca: str | None) -> Any:
    return ca if ca else True


def attest_options(f: Any) -> Any:
    """Options shared by `host attest` and `host start`."""
    for opt in reversed(
        [
            click.option("--hgs", "hgs_url", required=True, metavar="URL", help="The fabric's `hgs serve` URL."),
            click.option(
                "--host",
                "host_dir",
                required=True,
                type=click.Path(file_okay=False, exists=True),
                help="Host folder (`host new`); the health certificate is cached in it.",
            ),
            click.option(
                "--tpm",
                metavar="TCTI",
                help="Attest with the host's TPM (TPM quote), e.g. device:/dev/tpmrm0 "
                "or swtpm:host=127.0.0.1,port=2321; default host-key mode.",
            ),
            click.option(
                "--tcg-log",
                type=click.Path(dir_okay=False),
                help=f"TPM mode: the host's TCG log (default {SYSFS_TCG_LOG}).",
            ),
            click.option("--ci-policy-hash", default=None, help="TPM mode: hash of the applied CI policy (hex)."),
            click.option(
                "--refresh-margin",
                default="1h",
                show_default=True,
                metavar="DURATION",
                help="Attest again when less than this is left of the cached certificate (s/m/h/d).",
            ),
            click.option("--ca", type=click.Path(dir_okay=False, exists=True), help="CA bundle for an https:// HGS."),
        ]
    ):
        f = opt(f)
    return f


def register(cli: click.Group) -> None:
    @cli.group("host")
    def host() -> None:
        """The guarded host: identity, attestation to a fabric, starting shielded VMs."""

    @host.command("new")
    @click.argument("name")
    @click.option("-o", "--output", required=True, type=KEY_FOLDER, help="Host folder to create (keys 0600).")
    @click.option(
        "--key",
        type=click.Choice(["rsa3072", "rsa2048", "ec-p256", "ec-p384"]),
        default="ec-p256",
        show_default=True,
        help="Key kind of the host keys.",
    )
    @json_option
    def host_new(name: str, output: str, key: str, as_json: bool) -> None:
        """Create a host identity (host key + encryption key, 0600)."""
        h = new_host(name, output, key)
        emit({"name": h.name, "output": output}, as_json, f"host {name} created in {output}")

    @host.command("ek")
    @click.option(
        "--tpm",
        "tcti",
        required=True,
        metavar="TCTI",
        help="The host's TPM, e.g. device:/dev/tpmrm0 or swtpm:port=2321.",
    )
    @click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="PEM file to write the EK public key to.")
    @json_option
    def host_ek(tcti: str, output: str, as_json: bool) -> None:
        """Write the host TPM's endorsement key (EK, TCG RSA-2048 template) as PEM, for `hgs register-host --ek`."""
        import hashlib

        from cryptography.hazmat.primitives import serialization

        from ..hgs.tpmhost import TpmHost

        with TpmHost(tcti) as th:
            pem = th.ek_pem()
        spki = serialization.load_pem_public_key(pem.encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_bytes_atomic(output, pem.encode(), mode=0o644)
        digest = hashlib.sha256(spki).hexdigest()
        emit(
            {"output": output, "tpm": tcti, "ek_sha256": digest},
            as_json,
            f"EK public key of {tcti} written to {output} (SHA-256 of its SubjectPublicKeyInfo {digest})",
        )

    @host.command("evidence")
    @click.argument("host_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="Evidence file to write.")
    @click.option("--tcg-log", type=click.Path(dir_okay=False), help="TPM mode: the host's TCG event log.")
    @click.option("--ek", type=click.Path(dir_okay=False), help="TPM mode: the host's EK public key (PEM).")
    @click.option("--ci-policy-hash", default=None, help="TPM mode: hash of the applied CI policy (hex).")
    @json_option
    def host_evidence(
        host_dir: str, output: str, tcg_log: str | None, ek: str | None, ci_policy_hash: str | None, as_json: bool
    ) -> None:
        """Write attestation evidence signed by the host key (host-key mode, or TPM mode with --tcg-log)."""
        h = load_host(host_dir)
        data = create_evidence(
            h,
            tcg_log=_read(tcg_log) if tcg_log else None,
            ek_public_pem=_read(ek).decode(errors="replace") if ek else None,
            ci_policy_hash=ci_policy_hash,
        )
        write_bytes_atomic(output, data)
        emit({"output": output, "mode": "tpm" if tcg_log else "host-key"}, as_json, f"evidence written to {output}")

    @host.command("attest")
    @attest_options
    @click.option("--force", is_flag=True, help="Attest even if the cached certificate is still good.")
    @json_option
    def host_attest(
        hgs_url: str,
        host_dir: str,
        tpm: str | None,
        tcg_log: str | None,
        ci_policy_hash: str | None,
        refresh_margin: str,
        ca: str | None,
        force: bool,
        as_json: bool,
    ) -> None:
        """Get a health certificate from the fabric (reused from HOSTDIR while valid; exit 6 if refused)."""
        from ..host.health import attest_host

        st = attest_host(
            hgs_url,
            host_dir,
            tpm=tpm,
            tcg_log=_tpm_args(tpm, tcg_log),
            ci_policy_hash=ci_policy_hash,
            refresh_margin=_margin(refresh_margin),
            force=force,
            verify=_verify(ca),
        )
        emit(
            st.to_json(),
            as_json,
            lambda r: (
                f"health certificate {'reused from the cache, ' if r['cached'] else ''}issued "
                f"by {r['hgs']} ({r['mode']} mode), valid to {r['valid_to']}"
            ),
        )

    @host.command("start")
    @click.argument("disk", type=click.Path(dir_okay=False, exists=True))
    @click.option(
        "--kp",
        "kp_path",
        required=True,
        type=click.Path(dir_okay=False, exists=True),
        help="The VM's key protector (VM.kp).",
    )
    @attest_options
    @click.option(
        "--vtpm-state", type=click.Path(dir_okay=False), help="The VM's vTPM state (default: DISK with suffix .vtpm)."
    )
    @click.option(
        "--console",
        type=click.Choice(CONSOLES),
        default="none",
        show_default=True,
        help="serial = the serial port on this terminal, vnc = a display on 127.0.0.1; only for "
        "encryption-supported VMs.",
    )
    @click.option("--serial-log", type=click.Path(dir_okay=False), help="Write the VM's serial port to this file.")
    @click.option(
        "--accel",
        type=click.Choice(ACCELS),
        default="auto",
        show_default=True,
        help="auto = KVM when it runs a guest here, else TCG.",
    )
    @click.option(
        "--memory",
        "memory_mib",
        type=click.IntRange(128, 1 << 20),
        default=2048,
        show_default=True,
        help="Guest memory (MiB).",
    )
    @click.option("--cpus", type=click.IntRange(1, 256), default=2, show_default=True, help="Virtual CPUs of the VM.")
    @click.option("--secure-boot", is_flag=True, help="OVMF Secure Boot build (SMM, Microsoft keys enrolled).")
    @click.option("--no-reboot", is_flag=True, help="Stop the VM instead of rebooting it.")
    @click.option("--timeout", type=click.FloatRange(1), default=None, help="Kill the VM after this many seconds.")
    @click.option("--no-save-vtpm", is_flag=True, help="Do not write the vTPM state back when the VM stops.")
    @json_option
    def host_start(
        disk: str,
        kp_path: str,
        hgs_url: str,
        host_dir: str,
        tpm: str | None,
        tcg_log: str | None,
        ci_policy_hash: str | None,
        refresh_margin: str,
        ca: str | None,
        vtpm_state: str | None,
        console: str,
        serial_log: str | None,
        accel: str,
        memory_mib: int,
        cpus: int,
        secure_boot: bool,
        no_reboot: bool,
        timeout: float | None,
        no_save_vtpm: bool,
        as_json: bool,
    ) -> None:
        """Boot a shielded VM: key release from the fabric, swtpm on its vTPM state, QEMU with OVMF."""
        from ..host.start import start_vm

        r = start_vm(
            disk,
            _read(kp_path),
            hgs_url,
            host_dir,
            vtpm_state=vtpm_state,
            save_state=not no_save_vtpm,
            tpm=tpm,
            tcg_log=_tpm_args(tpm, tcg_log),
            ci_policy_hash=ci_policy_hash,
            refresh_margin=_margin(refresh_margin),
            verify=_verify(ca),
            console=console,
            serial_log=Path(serial_log) if serial_log else None,
            accel=accel,
            memory_mib=memory_mib,
            cpus=cpus,
            secure_boot=secure_boot,
            no_reboot=no_reboot,
            timeout=timeout,
        )
        emit(
            r.to_json(),
            as_json,
            lambda j: (
                f"VM {disk} ({j['policy']}) ran {j['vm']['seconds']} s under "
                f"{j['vm']['accel']}, exit {j['vm']['exit_code']}; vTPM state "
                f"{'saved to ' + j['vtpm_state'] if j['vtpm_state_saved'] else 'unchanged'}"
                + (
                    f", generation {j['vtpm_state_generation']} in the fabric's ledger"
                    if j["vtpm_state_generation"] is not None
                    else ""
                )
                + (
                    f" (not yet reported to the fabric: {j['vtpm_state_report_error']}; resent on the next start)"
                    if j["vtpm_state_report_error"]
                    else ""
                )
            ),
        )


__all__ = ["DEFAULT_REFRESH_MARGIN", "register"]
