"""`templatetool hgs ...`: guardian-side attestation (the `host` group lives in host_cmd)."""

from __future__ import annotations

from typing import Any

import click
from cryptography.hazmat.primitives import serialization

from ..atomic import write_bytes_atomic
from ..hgs import AttestationPolicy, attest, init_attestation, load_attestation, load_host
from ..hgs.host import pem_public
from .common import emit, json_option, read_small_file
from .policy import OUTPUT_FILE
from .tpm_cmd import PCR_BANK, PCR_LIST

#: Evidence, keys and TCG logs we read are small; refuse anything larger before reading it.
MAX_INPUT = 64 << 20


def _read(path: str, limit: int = MAX_INPUT) -> bytes:
    return read_small_file(path, "file", limit)


def _policy_text(p: AttestationPolicy) -> str:
    lines = [
        f"host keys: {', '.join(p.host_keys) or '(none)'}",
        f"TPM hosts: {', '.join(p.tpm_hosts) or '(none)'}",
        f"PCR baseline ({p.pcr_bank}): " + (", ".join(f"{k}" for k in sorted(p.pcr_baseline)) or "(none)"),
        f"CI policies: {len(p.ci_policies)}",
        f"health certificate lifetime: {p.health_hours} h",
    ]
    return "\n".join(lines)


def _sync_store(guardian_dir: str, db_url: str | None, pol: AttestationPolicy) -> str | None:
    """Push the folder's policy into the service's state store (so running `hgs serve` nodes use it
    at once): the --db URL, or the folder's default SQLite store when it exists. Returns the URL."""
    from pathlib import Path

    from ..hgs.store import DB_FILE, Store, default_url

    if db_url is None and not (Path(guardian_dir) / DB_FILE).exists():
        return None
    store = Store(db_url or default_url(guardian_dir))
    try:
        store.migrate()
        store.import_policy(pol)
        return str(store.engine.url.render_as_string(hide_password=True))
    finally:
        store.close()


DB_OPTION = click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="Also update this `hgs serve` state database "
    "(default: GUARDIAN_DIR/hgs-state.sqlite when it exists); running nodes use it at once.",
)


def register(cli: click.Group) -> None:
    @cli.group("hgs")
    def hgs() -> None:
        """Guardian side of attestation: which hosts a guardian trusts, health certificates."""

    @hgs.command("init")
    @click.argument("guardian_dir", type=click.Path(file_okay=False))
    @click.option(
        "--health-hours", type=click.IntRange(1, 24 * 30), default=None, help="Health certificate lifetime (8)."
    )
    @json_option
    def init(guardian_dir: str, health_hours: int | None, as_json: bool) -> None:
        """Create the guardian's attestation signer and an empty policy (idempotent)."""
        cert = init_attestation(guardian_dir)
        pol = AttestationPolicy.load(guardian_dir)
        if health_hours:
            pol.health_hours = health_hours
        pol.save(guardian_dir)
        emit(
            {"attestation_signer": cert.subject.rfc4514_string(), "policy": pol.to_json()},
            as_json,
            lambda r: f"attestation signer {r['attestation_signer']}\n" + _policy_text(pol),
        )

    @hgs.command("register-host")
    @click.argument("guardian_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("--host", "host_dir", type=click.Path(file_okay=False, exists=True), help="A host folder (host new).")
    @click.option("--host-key", type=click.Path(dir_okay=False, exists=True), help="A PEM public host key.")
    @click.option(
        "--ek",
        type=click.Path(dir_okay=False, exists=True),
        help="Register for TPM attestation by EK public key (PEM).",
    )
    @click.option("--name", required=True, help="Name to register the host under.")
    @DB_OPTION
    @json_option
    def register_host(
        guardian_dir: str,
        host_dir: str | None,
        host_key: str | None,
        ek: str | None,
        name: str,
        db_url: str | None,
        as_json: bool,
    ) -> None:
        """Register a host by host key (--host/--host-key) or by TPM EK (--ek)."""
        pol = AttestationPolicy.load(guardian_dir)
        if ek:
            pol.add_tpm_host(name, _read(ek).decode(errors="replace"))
        elif host_dir:
            pol.add_host_key(name, pem_public(load_host(host_dir).host_key.public_key()))
        elif host_key:
            pol.add_host_key(name, _read(host_key).decode(errors="replace"))
        else:
            raise click.UsageError("give --host, --host-key or --ek")
        pol.save(guardian_dir)
        synced = _sync_store(guardian_dir, db_url, pol)
        emit(
            {**pol.to_json(), "store": synced},
            as_json,
            lambda _: _policy_text(pol) + (f"\nstate store updated: {synced}" if synced else ""),
        )

    @hgs.command("baseline")
    @click.argument("guardian_dir", type=click.Path(file_okay=False, exists=True))
    @click.option("--tcg-log", required=True, type=click.Path(dir_okay=False), help="Reference TCG event log.")
    @click.option(
        "--pcrs", type=PCR_LIST, default="0,1,2,3,4,5,7,11", show_default=True, help="PCRs (0-23) of the baseline."
    )
    @click.option("--bank", type=PCR_BANK, default="sha256", show_default=True, help="PCR bank.")
    @click.option("--allow-ci", "ci", multiple=True, help="Allowed code-integrity policy hash (hex); repeatable.")
    @DB_OPTION
    @json_option
    def baseline(
        guardian_dir: str,
        tcg_log: str,
        pcrs: list[int],
        bank: str,
        ci: tuple[str, ...],
        db_url: str | None,
        as_json: bool,
    ) -> None:
        """Set the TPM PCR baseline from a reference host's TCG log (and allowed CI policies)."""
        pol = AttestationPolicy.load(guardian_dir)
        pol.set_baseline_from_log(_read(tcg_log), tuple(pcrs), bank)
        for c in ci:
            pol.allow_ci_policy(c)
        pol.save(guardian_dir)
        synced = _sync_store(guardian_dir, db_url, pol)
        emit(
            {**pol.to_json(), "store": synced},
            as_json,
            lambda _: _policy_text(pol) + (f"\nstate store updated: {synced}" if synced else ""),
        )

    @hgs.command("attest")
    @click.argument("guardian_dir", type=click.Path(file_okay=False, exists=True))
    @click.argument("evidence", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="Health certificate (PEM).")
    @json_option
    def attest_cmd(guardian_dir: str, evidence: str, output: str, as_json: bool) -> None:
        """Check host evidence; on success write a health certificate (exit 6 naming the failed check)."""
        key, cert = load_attestation(guardian_dir)
        from ..hgs.host import MAX_EVIDENCE

        hc, checks = attest(
            AttestationPolicy.load(guardian_dir), _read(evidence, MAX_EVIDENCE), key, cert, where=evidence
        )
        write_bytes_atomic(output, hc.public_bytes(serialization.Encoding.PEM))
        res: dict[str, Any] = {
            "output": output,
            "health_certificate": output,
            "expires": hc.not_valid_after_utc.isoformat(),
            "checks": [c.to_json() for c in checks],
        }
        emit(
            res,
            as_json,
            lambda r: "\n".join(
                [f"  ok  {c['check']}: {c['detail']}" for c in r["checks"]]
                + [f"health certificate {output} (expires {r['expires']})"]
            ),
        )

    from . import host_cmd

    host_cmd.register(cli)
