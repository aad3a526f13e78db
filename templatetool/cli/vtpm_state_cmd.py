"""CLI: ``templatetool vtpm manufacture | rekey | state`` — a real swtpm vTPM state encrypted by a
transport key K (library: tpm/vtpm_manufacture.py, tpm/swtpm_state.py). Thin: parse and print."""

from __future__ import annotations

import os

import click

from ..atomic import write_bytes_atomic
from ..errors import UsageError
from ..secrets import read_secret, write_secret_file
from .common import emit, json_option, read_small_file
from .policy import KEY_FILE, OUTPUT_FILE
from .tpm_cmd import PCR_BANK, PCR_LIST


def _read(path: str, what: str, limit: int = 16 << 20) -> bytes:
    return read_small_file(path, what, limit)


def _read_key(path: str) -> bytes:
    from ..tpm.swtpm_state import KEY_SIZE

    key = _read(path, "key file", 4096)
    if len(key) != KEY_SIZE:
        raise UsageError(f"key file must hold exactly {KEY_SIZE} raw bytes (has {len(key)})", path)
    return key


def _fresh(*paths: str | None) -> None:
    for p in paths:
        if p and os.path.lexists(p):
            raise UsageError("output exists", p, "choose another name; keys and states are never overwritten")


@click.command("manufacture")
@click.option(
    "-o",
    "--output",
    required=True,
    type=OUTPUT_FILE,
    help="Write the encrypted vTPM state (swtpm tpm2-00.permall) here.",
)
@click.option("--key-out", required=True, type=KEY_FILE, help="Write the fresh 32-byte transport key K here (0600).")
@click.option(
    "--secret-file", type=click.Path(dir_okay=False), help="Seal this secret (1..128 bytes) to the vTPM's own SRK."
)
@click.option("--pcrs", type=PCR_LIST, help="PCR indices 0..23 of the policy [default with --tcg-log: 7,11].")
@click.option("--pcr-values", help="7=HEX,11=HEX, or a file (JSON from 'tpm pcrs --json', or 7=HEX lines).")
@click.option("--tcg-log", type=click.Path(dir_okay=False), help="Replay this TCG event log for the PCR values.")
@click.option("--bank", type=PCR_BANK, default="sha256", show_default=True, help="PCR bank of the policy.")
@click.option("--pin-env", metavar="VAR", help="Environment variable holding a PIN (adds PolicyAuthValue).")
@click.option("--protector-out", type=OUTPUT_FILE, help="Write the sealed protector payload here.")
@click.option("--srk-out", type=OUTPUT_FILE, help="Write the SRK public (TPM2B_PUBLIC) here.")
@click.option("--ek-out", type=OUTPUT_FILE, help="Write the RSA EK public (TPM2B_PUBLIC) here.")
@json_option
def manufacture_cmd(
    output: str,
    key_out: str,
    secret_file: str | None,
    pcrs: list[int] | None,
    pcr_values: str | None,
    tcg_log: str | None,
    bank: str,
    pin_env: str | None,
    protector_out: str | None,
    srk_out: str | None,
    ek_out: str | None,
    as_json: bool,
) -> None:
    """Manufacture a VM's vTPM with swtpm (EK + SRK), encrypted under a fresh transport key."""
    from ..tpm.policy import parse_pcr_values
    from ..tpm.protector import resolve_pcr_values
    from ..tpm.vtpm_manufacture import manufacture_vtpm

    if bool(secret_file) != bool(protector_out):
        raise UsageError("--secret-file and --protector-out go together")
    if not secret_file and (pcrs or pcr_values or tcg_log or pin_env):
        raise UsageError(
            "--pcrs, --pcr-values, --tcg-log and --pin-env describe the sealed secret: they need --secret-file"
        )
    _fresh(output, key_out, protector_out, srk_out, ek_out)
    secret = vals = pin = None
    if secret_file:
        secret = _read(secret_file, "secret file", 4096)
        if pcr_values and tcg_log:
            raise UsageError("--pcr-values and --tcg-log are exclusive")
        if not pcr_values and not tcg_log:
            raise UsageError("give --pcr-values or --tcg-log", hint="e.g. --pcrs 7 --pcr-values 7=HEX")
        sel = pcrs or ([7, 11] if tcg_log else None)  # as encrypt --tcg-log: Windows' Secure Boot PCRs
        parsed = parse_pcr_values(pcr_values, bank) if pcr_values else None
        vals = resolve_pcr_values(sel, bank, pcr_values=parsed, tcg_log=tcg_log)
        pin = read_secret(pin_env, "PIN: ") if pin_env else None
    m = manufacture_vtpm(secret, vals, bank, pin=pin)
    write_secret_file(key_out, m.key)
    write_bytes_atomic(output, m.state, mode=0o600)
    if protector_out and m.protector is not None:
        write_bytes_atomic(protector_out, m.protector, mode=0o600)
    if srk_out:
        write_bytes_atomic(srk_out, m.srk.tpm2b_public)
    if ek_out:
        write_bytes_atomic(ek_out, m.ek.tpm2b_public)
    doc = {"output": output, "key_out": key_out, "protector_out": protector_out, **m.to_json()}
    emit(
        doc,
        as_json,
        lambda d: (
            f"vTPM state {output} ({d['state_size']} bytes, aes-256-cbc), key {key_out} (0600); "
            f"SRK {d['srk_name']}" + (f"; sealed to it: {protector_out}" if protector_out else "")
        ),
    )


@click.command("rekey")
@click.argument("state", type=click.Path(dir_okay=False))
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False),
    help="The state's current 32-byte key (omit for an unencrypted state).",
)
@click.option("--new-key-out", required=True, type=KEY_FILE, help="Write the fresh 32-byte key here (0600).")
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="Write the re-keyed state here.")
@json_option
def rekey_cmd(state: str, key_file: str | None, new_key_out: str, output: str, as_json: bool) -> None:
    """Re-encrypt a swtpm state under a fresh transport key (the old key is verified first)."""
    from ..tpm.swtpm_state import new_transport_key, rekey_state

    _fresh(output, new_key_out)
    data = _read(state, "vTPM state")
    old = _read_key(key_file) if key_file else None
    new = new_transport_key()
    out = rekey_state(data, old, new, state)
    write_secret_file(new_key_out, new)
    write_bytes_atomic(output, out, mode=0o600)
    emit(
        {"output": output, "new_key_out": new_key_out, "size": len(out)},
        as_json,
        f"re-keyed {state} -> {output} ({len(out)} bytes); new key {new_key_out} (0600)",
    )


@click.command("state")
@click.argument("state", type=click.Path(dir_okay=False))
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="Verify (HMAC) and decrypt with this key.")
@json_option
def state_cmd(state: str, key_file: str | None, as_json: bool) -> None:
    """Describe a swtpm state blob; with --key, verify it."""
    from ..tpm.swtpm_state import decrypt_state, parse_state

    data = _read(state, "vTPM state")
    blob = parse_state(data, state)
    doc = {"path": state, "size": len(data), **blob.to_json()}
    if key_file:
        doc["verified"] = True
        doc["plaintext_size"] = len(decrypt_state(data, _read_key(key_file), state))
    emit(doc, as_json, _state_text)


def _state_text(d: dict[str, object]) -> str:
    tlvs = d.get("tlvs")
    rows = tlvs if isinstance(tlvs, list) else []  # StateBlob.to_json rows: {"tag", "length"}
    lines = [f"{k}: {v}" for k, v in d.items() if k != "tlvs"]
    lines.append("tlvs: " + ", ".join(f"tag {t['tag']} ({t['length']} bytes)" for t in rows))
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    """Add ``manufacture``, ``rekey`` and ``state`` to the ``vtpm`` group (made here if absent)."""
    group = cli.commands.get("vtpm")
    if not isinstance(group, click.Group):

        @click.group("vtpm")
        def vtpm_group() -> None:
            """vTPM keys and states."""

        group = vtpm_group
        cli.add_command(group)
    for cmd in (manufacture_cmd, rekey_cmd, state_cmd):
        group.add_command(cmd)
