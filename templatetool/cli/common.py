"""Shared CLI helpers: the --json envelope, one-line errors, exit codes, sizes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import errors as _errors
from ..errors import FormatError, NotFoundError, ResourceError, TemplateToolError, UsageError
from ..secrets import SecretSource, env_or_prompt

#: The typed error class of each documented exit code (docs/exit-codes.md).
ERRORS_BY_CODE: dict[int, type[TemplateToolError]] = {
    c.exit_code: c
    for c in (
        _errors.UsageError,
        _errors.FormatError,
        _errors.IntegrityError,
        _errors.CredentialError,
        _errors.PolicyError,
        _errors.UnsupportedError,
        _errors.ResourceError,
        _errors.NotFoundError,
    )
}

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="Print the JSON envelope (docs/cli.md) on stdout.")


def command_name() -> str:
    """The running command's path without the program name (``vhdx convert``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return ""
    return " ".join(ctx.command_path.split()[1:])


def envelope(result: Any) -> dict[str, Any]:
    """The --json success document of every command (docs/cli.md)."""
    return {"ok": True, "command": command_name(), "result": result}


def emit(
    result: Any, as_json: bool, text: Callable[[Any], str] | str | None = None, error: TemplateToolError | None = None
) -> None:
    """Print ``result`` as the JSON envelope, or as text (``text(result)`` or the string given).

    With ``error`` (a report whose outcome is a failure: a mismatch, a failed check) the text is
    printed and then ``error`` raised; with --json the report travels in the error document's
    ``result`` instead (``{"ok": false, "command", "error", "result"}``).
    """
    if error is not None:
        if as_json:
            error.result = result  # type: ignore[attr-defined]
            raise error
        out = text(result) if callable(text) else text
        if out:
            click.echo(out)
        raise error
    if as_json:
        click.echo(json.dumps(envelope(result), indent=2, sort_keys=False, default=json_default))
    elif text is not None:
        out = text(result) if callable(text) else text
        if out:
            click.echo(out)


def renamed(d: dict[str, Any], **names: str) -> dict[str, Any]:
    """``d`` with keys renamed (``renamed(r, destination="output")``) to the envelope's common
    names (docs/cli.md: input, output, size, seconds, timings_s), order kept."""
    return {names.get(k, k): v for k, v in d.items()}


def json_default(o: Any) -> Any:
    """JSON for bytes (hex), objects with ``to_json`` and plain objects."""
    if isinstance(o, bytes):
        return o.hex()
    if hasattr(o, "to_json"):
        return o.to_json()
    if hasattr(o, "__dict__"):
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}
    return str(o)


_json_default = json_default


def human_size(n: int) -> str:
    """Format a byte count like 64.0 MiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def parse_size(text: str) -> int:
    """Parse sizes like 64M, 1G, 4096, 32MiB (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            mult, t = m, t[:-1]
            break
    try:
        return int(t) * mult
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r} (use e.g. 64M, 1G)") from None


class SizeType(click.ParamType):  # type: ignore[type-arg]
    """click type for sizes with K/M/G/T suffixes."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        return parse_size(str(value))


SIZE = SizeType()


#: The largest whole-file input a command reads (keys, evidence, logs, protectors, credentials).
MAX_SMALL_INPUT = 64 << 20


def read_small_file(path: str, what: str = "file", limit: int = MAX_SMALL_INPUT) -> bytes:
    """Read a whole small input file; a missing file, a folder, an oversized file or an I/O error
    is one typed error naming ``what`` and ``path`` (the size is checked before reading)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise FormatError(f"{what} is too large ({size} bytes, limit {limit})", path)
        return p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found", path) from None
    except IsADirectoryError:
        raise UsageError(f"{what}: expected a file, got a folder", path) from None
    except OSError as e:
        raise ResourceError(f"cannot read {what}: {e.strerror}", path) from None


def guardian_password(path: str, env_var: str | None) -> SecretSource:
    """The password of the guardian at ``path`` as a lazy source: ``$env_var``, else a terminal
    prompt; asked only when the guardian's keys turn out to be password-protected."""
    return env_or_prompt(env_var, f"password for guardian {os.path.basename(os.path.normpath(path))}: ")


#: CLI wording of library hints, by error code: the library says what to do in its own terms
#: (``allow_expired``), the command line names its flag. The codes are the library's.
CLI_HINTS: dict[str, str] = {
    "pki.untrusted-root": "add the root with --trust, or pass --allow-untrusted-root (self-signed guardians)",
    "pki.untrusted-ca": "add the issuing CA with --trust, or pass --allow-untrusted-root",
    "pki.expired": "renew the certificate, or pass --allow-expired to judge the chain inside its validity periods",
    "cert.expired": "renew it, or pass --allow-expired to accept it anyway",
    "cert.not-yet-valid": "check the clock, or pass --allow-expired",
    "hgs.ek-unregistered": "register it with `hgs register-host --ek`",
    "vhdx.child-subformat": "drop --subformat",
    "vhdx.parent-missing": "the parent was moved or deleted: put it back or pass its location "
    "(parent_search / --parent-dir)",
    "vhdx.sector-size-raw-only": "--logical-sector-size reinterprets raw images only",
    "tpm.pcr-values-needed": "--pcr-values or --tcg-log",
    "tpm.pcr-source": "--pcr-values or --tcg-log",
    "tpm.pcrs-with-log": "e.g. --pcrs 7,11",
    "tpm.pcrs-empty": "use e.g. --pcrs 7,11",
    "tpm.no-pcrs": "give --pcrs and their values",
    "tpm.pin-needed": "pass --pin-env VAR",
    "tpm.parent-handle": "was the blob sealed to this vTPM's SRK/EK? pass its persistent handle with --parent-handle",
    "unlock.no-vtpm-key": "use --tpm TCTI",
    "protect.no-output": "pass -o TEMPLATE.vhdx (or --in-place)",
    "protect.output-is-input": "protect writes a new disk; choose another name (or use --in-place deliberately)",
    "protect.preflight": "run 'templatetool protect --check' for the list",
    "output.exists": "choose another name, or pass --overwrite to replace it",
    "disk.no-os-volume": "pass --partition N to choose one",
    "shield.no-swtpm": "install the Debian packages swtpm and swtpm-tools, or shield with --vtpm software "
    "(a software vTPM key instead of a vTPM state)",
    "host.tcg-log-needed": "give --tcg-log",
    "host.kvm-failed": "retry with --accel tcg",
    "host.vtpm-state-missing": "shield writes VM.vtpm beside VM.vhdx; or give --vtpm-state",
    "luks.pcr-values": "give a value for every --tpm2-pcrs PCR",
    "luks.sector-size": "use --sector-size 512",
    "linux.root-partition": "pass --root-partition N",
    "shield.template-passphrase": "pass --template-passphrase-env VAR",
    "bitlocker.not-converting": "start with `templatetool encrypt --in-place`",
    "encrypt.tpm-alone": "add --recovery-password-out FILE or --show-recovery-password "
    "(or --startup-key-out / --password-env)",
    "encrypt.no-protector": "give --recovery-password-out FILE, --show-recovery-password, "
    "--startup-key-out FILE.bek or --password-env VAR",
    "decrypt.credential": "--recovery-password-file, --recovery-password-env, --startup-key, --password-env, "
    "--clear-key or --tpm TCTI",
}


def cli_hint(err: TemplateToolError) -> str | None:
    """The hint the CLI prints for ``err``: its flag wording when the code has one, else the
    library's hint."""
    return CLI_HINTS.get(err.code, err.hint)


def stderr(msg: str) -> None:
    """Print a line to stderr."""
    click.echo(msg, err=True)
    sys.stderr.flush()
