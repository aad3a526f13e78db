"""CLI: ``templatetool tpm ...`` (policy digests, event-log replay, seal/unseal) and ``vtpm new``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import click

from ..atomic import write_bytes_atomic
from ..errors import UsageError
from ..secrets import read_secret, write_secret_file
from . import policy
from .common import emit, json_option, read_small_file
from .policy import OUTPUT_FILE, OUTPUT_PREFIX, Out


class PcrListType(click.ParamType):  # type: ignore[type-arg]
    """click type for a PCR list ("7,11", "0-4,7"): sorted indices, each 0..23. Bad input is a
    :class:`UsageError` (exit 2) naming the option, raised while the options are parsed."""

    name = "pcrs"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[int]:
        from ..tpm.algs import check_pcrs, parse_pcr_list

        try:
            if isinstance(value, (list, tuple)):
                return check_pcrs(int(v) for v in value)
            return parse_pcr_list(str(value))
        except UsageError as e:
            raise UsageError(e.what, _opt_name(param), e.hint, code=e.code) from None


class PcrBankType(click.ParamType):  # type: ignore[type-arg]
    """click type for a PCR bank name (sha1, sha256, sha384, sha512): the normalised name, or a
    :class:`UsageError` (exit 2) naming the option."""

    name = "bank"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from ..tpm.algs import ALG_BY_NAME

        name = str(value).strip().lower().replace("-", "")
        if name not in ALG_BY_NAME:
            raise UsageError(
                f"unknown PCR bank {str(value)[:20]!r}", _opt_name(param), "use " + ", ".join(sorted(ALG_BY_NAME))
            )
        return name


def _opt_name(param: Any) -> str:
    opts = getattr(param, "opts", None)
    return opts[0] if opts else "PCR option"


#: Shared PCR option types: ``encrypt``, ``shield`` and the ``tpm`` commands validate with these.
PCR_LIST = PcrListType()
PCR_BANK = PcrBankType()
#: The name other commands look for (``--bank`` / ``--pcr-bank``).
BANK = PCR_BANK


def parse_pcr_list(text: str) -> tuple[int, ...]:
    """Parse a PCR list ("7,11", "0-4,7") into sorted indices 0..23: the one parser every
    command shares (:data:`PCR_LIST` at the option). Bad input is a UsageError (exit 2)."""
    return tuple(PCR_LIST.convert(text, None, None))


def _pcr_values(
    pcrs: str | Sequence[int] | None, pcr_values: str | None, tcg_log: str | None, bank: str
) -> dict[int, bytes]:
    from ..tpm.policy import parse_pcr_values
    from ..tpm.protector import resolve_pcr_values

    sel = PCR_LIST.convert(pcrs, None, None) if pcrs else None
    if pcr_values and tcg_log:
        raise UsageError("--pcr-values and --tcg-log are exclusive")
    if not pcr_values and not tcg_log:
        raise UsageError("give --pcr-values or --tcg-log", hint="e.g. --pcrs 7,11 --pcr-values 7=HEX,11=HEX")
    vals = parse_pcr_values(pcr_values, bank) if pcr_values else None
    return resolve_pcr_values(sel, bank, pcr_values=vals, tcg_log=tcg_log)


def _read_file(path: str, what: str, limit: int = 1 << 20) -> bytes:
    return read_small_file(path, what, limit)


def _pin(pin_env: str | None, ask: bool) -> str | None:
    if pin_env:
        return read_secret(pin_env, "PIN: ")
    if ask:
        return read_secret(None, "PIN: ", confirm=True)
    return None


bank_option = click.option(
    "--bank", type=PCR_BANK, default="sha256", show_default=True, help="PCR bank: sha1, sha256, sha384, sha512."
)
pcrs_option = click.option("--pcrs", type=PCR_LIST, help="PCR indices 0..23, e.g. 7,11.")
values_option = click.option(
    "--pcr-values", help="7=HEX,11=HEX, or a file (JSON from 'tpm pcrs --json', or 7=HEX lines)."
)
log_option = click.option(
    "--tcg-log", type=click.Path(dir_okay=False), help="Replay this TCG event log for the PCR values."
)


@click.group("tpm")
def tpm_group() -> None:
    """Offline TPM 2.0 sealing: policy digests, TCG log replay, seal and unseal."""


@tpm_group.command("pcrs")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--all", "all_pcrs", is_flag=True, help="Print all 24 PCRs, not only measured ones.")
@click.option("--bank", help="Only this bank.")
@json_option
def pcrs_cmd(log: str, all_pcrs: bool, bank: str | None, as_json: bool) -> None:
    """Replay a TCG PC Client event LOG and print the PCR values it implies."""
    from ..tpm.eventlog import replay_log

    r = replay_log(log)
    doc = r.to_json(all_pcrs)
    if bank:
        if bank not in doc["banks"]:  # type: ignore[operator]
            raise UsageError(f"the log has no {bank} bank", log)
        doc["banks"] = {bank: doc["banks"][bank]}  # type: ignore[index]

    def text(d: dict[str, Any]) -> str:
        lines = [f"{d['format']} log, {d['events']} measured events, startup locality {d['startup_locality']}"]
        for b, vals in d["banks"].items():
            for i, v in vals.items():
                lines.append(f"{b}:{int(i):>2} = {v}")
        for b in d["skipped_banks"]:
            lines.append(f"{b}: not replayed (unsupported hash)")
        return "\n".join(lines)

    emit(doc, as_json, text)


@tpm_group.command("policy")
@pcrs_option
@values_option
@log_option
@bank_option
@click.option("--pin", "with_pin", is_flag=True, help="Add PolicyAuthValue (a PIN).")
@json_option
def policy_cmd(
    pcrs: str | None, pcr_values: str | None, tcg_log: str | None, bank: str, with_pin: bool, as_json: bool
) -> None:
    """Print the policy digest (PolicyPCR [+ PolicyAuthValue]) for the given PCR values."""
    from ..tpm.policy import compute_policy

    pol = compute_policy(bank, _pcr_values(pcrs, pcr_values, tcg_log, bank), auth_value=with_pin)
    emit(pol.to_json(), as_json, lambda d: d["policy_digest"])


@tpm_group.command("parent")
@click.argument("parent", type=click.Path(dir_okay=False))
@click.option("--template", type=click.Choice(["srk", "ek"]), help="Template for a bare key/certificate.")
@json_option
def parent_cmd(parent: str, template: str | None, as_json: bool) -> None:
    """Show a parent key (TPM2B_PUBLIC, PEM public key or certificate) and its TPM Name."""
    from ..tpm.keys import load_parent

    d = load_parent(parent, template).describe()
    emit(d, as_json, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))


@tpm_group.command("seal")
@click.option(
    "--parent",
    required=True,
    type=click.Path(dir_okay=False),
    help="Parent public: TPM2B_PUBLIC, PEM public key, or EK/SRK certificate.",
)
@click.option("--parent-template", type=click.Choice(["srk", "ek"]), help="Template for a bare key/certificate.")
@pcrs_option
@values_option
@log_option
@bank_option
@click.option("--pin-env", metavar="VAR", help="Environment variable holding a PIN (adds PolicyAuthValue).")
@click.option("--secret-file", required=True, type=click.Path(dir_okay=False), help="Secret to seal (1..128 bytes).")
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="Protector payload to write.")
@click.option(
    "--tpm2-tools", "tools_prefix", type=OUTPUT_PREFIX, help="Also write PREFIX.pub/.priv/.seed for tpm2_import."
)
@json_option
@policy.derived_outputs(
    lambda p: (
        [Out(f"--tpm2-tools (PREFIX{e})", p["tools_prefix"] + e) for e in (".pub", ".priv", ".seed")]
        if p.get("tools_prefix")
        else []
    )
)
def seal_cmd(
    parent: str,
    parent_template: str | None,
    pcrs: str | None,
    pcr_values: str | None,
    tcg_log: str | None,
    bank: str,
    pin_env: str | None,
    secret_file: str,
    output: str,
    tools_prefix: str | None,
    as_json: bool,
) -> None:
    """Seal a secret offline to a (v)TPM parent key under a PCR policy."""
    from ..tpm.keys import load_parent
    from ..tpm.protector import parse_protector, seal_to_parent

    par = load_parent(parent, parent_template)
    vals = _pcr_values(pcrs, pcr_values, tcg_log, bank)
    secret = _read_file(secret_file, "secret file", 4096)
    pin = _pin(pin_env, False)
    payload = seal_to_parent(par, secret, bank, vals, pin=pin)
    write_bytes_atomic(output, payload, mode=0o600)
    prot = parse_protector(payload)
    if tools_prefix:
        write_bytes_atomic(tools_prefix + ".pub", prot.blob.tpm2b_public())
        write_bytes_atomic(tools_prefix + ".priv", prot.blob.tpm2b_private())
        write_bytes_atomic(tools_prefix + ".seed", prot.blob.tpm2b_encrypted_secret())
    doc = {"output": output, **prot.to_json()}
    emit(doc, as_json, lambda d: f"sealed to parent {d['parent_name']} ({d['bank']} PCRs {d['pcrs']}); wrote {output}")


@tpm_group.command("show")
@click.argument("blob", type=click.Path(dir_okay=False))
@json_option
def show_cmd(blob: str, as_json: bool) -> None:
    """Describe a vTPM protector payload."""
    from ..tpm.protector import parse_protector

    prot = parse_protector(_read_file(blob, "protector"), blob)
    emit(prot.to_json(), as_json, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))


@tpm_group.command("unseal")
@click.argument("blob", type=click.Path(dir_okay=False))
@click.option("--tpm", "tcti", help="TCTI of the TPM, e.g. swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0.")
@click.option("--parent-handle", help="Persistent handle of the parent (default: the recorded one, 0x81000001).")
@click.option(
    "--key",
    "key_file",
    type=click.Path(dir_okay=False),
    help="Software unseal with the vTPM private key (needs --pcr-values or --tcg-log).",
)
@values_option
@log_option
@click.option("--pin-env", metavar="VAR", help="Environment variable holding the PIN.")
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="Write the secret here (0600).")
@json_option
def unseal_cmd(
    blob: str,
    tcti: str | None,
    parent_handle: str | None,
    key_file: str | None,
    pcr_values: str | None,
    tcg_log: str | None,
    pin_env: str | None,
    output: str,
    as_json: bool,
) -> None:
    """Unseal a vTPM protector through a TPM (--tpm) or with the vTPM private key (--key)."""
    from ..tpm.algs import bank_name
    from ..tpm.protector import parse_protector, unseal_with_software_key, unseal_with_tpm

    prot = parse_protector(_read_file(blob, "protector"), blob)
    if bool(tcti) == bool(key_file):
        raise UsageError("give exactly one of --tpm and --key")
    pin = _pin(pin_env, False) if prot.has_pin or pin_env else None
    if prot.has_pin and pin is None:
        raise UsageError("this protector needs a PIN", hint="pass --pin-env VAR")
    if tcti:
        handle = None
        if parent_handle:
            try:
                handle = int(parent_handle, 0)
            except ValueError:
                raise UsageError(f"bad handle {parent_handle!r}", hint="e.g. 0x81000001") from None
        secret = unseal_with_tpm(prot, tcti, pin=pin, parent_handle=handle)
    else:
        bank = bank_name(prot.bank)
        vals = _pcr_values(",".join(map(str, prot.pcrs)), pcr_values, tcg_log, bank)
        secret = unseal_with_software_key(prot, key_file, vals, pin)  # type: ignore[arg-type]
    write_secret_file(output, secret)
    emit({"output": output, "size": len(secret)}, as_json, f"unsealed {len(secret)} bytes to {output}")


def _vtpm_base(p: dict[str, Any]) -> str | None:
    """vtpm new's output prefix: -o NAME, or OUT (OUT/vtpm when OUT is a folder)."""
    if bool(p.get("out")) == bool(p.get("name")):
        return None
    out = p.get("out")
    if out and os.path.isdir(out):
        return os.path.join(out, "vtpm")
    return p.get("name") or out


@click.group("vtpm")
def vtpm_group() -> None:
    """Software vTPM storage keys."""


@vtpm_group.command("new")
@click.argument("out", required=False, type=OUTPUT_PREFIX)
@click.option(
    "-o", "--output", "name", type=OUTPUT_PREFIX, help="Output name prefix: writes NAME.key (0600), NAME.pub, NAME.pem."
)
@click.option(
    "--type",
    "kind",
    type=click.Choice(["rsa", "ecc"]),
    default="rsa",
    show_default=True,
    help="RSA-2048 or ECC NIST P-256.",
)
@json_option
@policy.derived_outputs(
    lambda p: (
        [Out(f"vtpm key file (*{e})", (_vtpm_base(p) or "") + e, "key") for e in (".key", ".pub", ".pem")]
        if _vtpm_base(p)
        else []
    )
)
def vtpm_new_cmd(out: str | None, name: str | None, kind: str, as_json: bool) -> None:
    """Create a vTPM storage key pair (OUT may be a directory: writes OUT/vtpm.*)."""
    from ..tpm.keys import create_vtpm_key

    if bool(out) == bool(name):
        raise UsageError("give an output directory or -o NAME (one of them)")
    base = _vtpm_base({"out": out, "name": name})
    assert base is not None  # existing key files were refused by the output policy (cli/policy.py)
    res = create_vtpm_key(base, kind)
    emit(
        res.to_json(), as_json, lambda d: f"wrote {d['key']} (private, 0600), {d['pub']}, {d['pem']}; Name {d['name']}"
    )


# --- options for other commands (encrypt / decrypt) -------------------------------------------


def tpm_seal_options(f: Any) -> Any:
    """click options adding a vTPM protector to an encrypt-like command: ``--tpm-parent``,
    ``--tpm-parent-template``, ``--pcrs``, ``--pcr-values``, ``--tcg-log``, ``--bank`` and
    ``--pin-env`` (keyword names ``tpm_*``). Pass the values to :func:`vtpm_from_options`."""
    opts = [
        click.option(
            "--tpm-parent",
            type=click.Path(dir_okay=False),
            help="Add a vTPM protector sealed to this parent (TPM2B_PUBLIC, PEM public key, EK/SRK cert).",
        ),
        click.option("--tpm-parent-template", type=click.Choice(["srk", "ek"]), help="Template for a bare key/cert."),
        click.option(
            "--pcrs",
            "tpm_pcrs",
            type=PCR_LIST,
            default=None,
            help="PCRs 0..23 of the vTPM policy [default: those in --pcr-values; 7,11 with --tcg-log].",
        ),
        click.option("--pcr-values", "tpm_pcr_values", help="7=HEX,11=HEX or a file."),
        click.option("--tcg-log", "tpm_tcg_log", type=click.Path(dir_okay=False), help="Reference TCG event log."),
        click.option(
            "--bank",
            "tpm_bank",
            type=PCR_BANK,
            default="sha256",
            show_default=True,
            help="PCR bank of the vTPM policy.",
        ),
        click.option(
            "--pin-env", "tpm_pin_env", metavar="VAR", help="TPM+PIN: the PIN is in $VAR (adds PolicyAuthValue)."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


#: PCRs sealed to with --tcg-log when --pcrs is not given (Windows' UEFI Secure Boot default).
DEFAULT_LOG_PCRS = (7, 11)


def vtpm_from_options(
    tpm_parent: str | None,
    tpm_parent_template: str | None = None,
    tpm_pcrs: str | Sequence[int] | None = None,
    tpm_pcr_values: str | None = None,
    tpm_tcg_log: str | None = None,
    tpm_bank: str = "sha256",
    tpm_pin_env: str | None = None,
) -> tuple[Any, dict[str, Any]] | None:
    """(sealer, description) for :func:`tpm_seal_options` values, or None without --tpm-parent.

    Everything (parent, PCR values or log replay, PIN) is read and checked now, before any disk
    is touched. The description (parent Name, bank, PCRs, pin) holds no secret."""
    from ..tpm.keys import load_parent
    from ..tpm.protector import make_sealer

    if not tpm_parent:
        ctx = click.get_current_context(silent=True)
        bank_given = ctx is not None and ctx.get_parameter_source("tpm_bank") == click.core.ParameterSource.COMMANDLINE
        if tpm_pcrs or tpm_pcr_values or tpm_tcg_log or tpm_pin_env or tpm_parent_template or bank_given:
            raise UsageError(
                "--pcrs, --pcr-values, --tcg-log, --bank, --pin-env and --tpm-parent-template describe "
                "a vTPM protector: they need --tpm-parent"
            )
        return None
    bank = PCR_BANK.convert(tpm_bank, None, None)
    pcrs: Sequence[int] | None = PCR_LIST.convert(tpm_pcrs, None, None) if tpm_pcrs else None
    if pcrs is None and tpm_tcg_log:
        pcrs = DEFAULT_LOG_PCRS
    vals = _pcr_values(pcrs, tpm_pcr_values, tpm_tcg_log, bank)
    parent = load_parent(tpm_parent, tpm_parent_template)
    pin = _pin(tpm_pin_env, False)
    seal = make_sealer(parent, sorted(vals), vals, bank=bank, pin=pin)
    return seal, {"parent_name": parent.name.hex(), "bank": bank, "pcrs": sorted(vals), "pin": pin is not None}


def sealer_from_options(
    tpm_parent: str | None,
    tpm_parent_template: str | None = None,
    tpm_pcrs: str | Sequence[int] | None = None,
    tpm_pcr_values: str | None = None,
    tpm_tcg_log: str | None = None,
    tpm_bank: str = "sha256",
    tpm_pin_env: str | None = None,
) -> Any:
    """The BitLocker sealer for :func:`tpm_seal_options` values, or None without --tpm-parent."""
    r = vtpm_from_options(tpm_parent, tpm_parent_template, tpm_pcrs, tpm_pcr_values, tpm_tcg_log, tpm_bank, tpm_pin_env)
    return r[0] if r else None


def register(cli: click.Group) -> None:
    """Add the ``tpm`` and ``vtpm`` groups."""
    cli.add_command(tpm_group)
    cli.add_command(vtpm_group)
