"""The templatetool command: a thin click layer over the library.

Each command module in ``templatetool.cli`` exposes ``register(group)``; this module loads them,
runs the command and turns every :class:`~templatetool.errors.TemplateToolError` into one line on
stderr and its documented exit code (docs/exit-codes.md). Anything else is an internal error
(exit 70) printed as one line; set TEMPLATETOOL_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import click

from .. import __version__
from ..errors import TemplateToolError
from ..progress import set_quiet

#: Command modules, loaded in this order. Each defines ``register(cli)``.
COMMAND_MODULES = [
    "inspect_cmd",
    "vhdx_cmd",
    "bitlocker_cmd",
    "tpm_cmd",
    "catalog_cmd",
    "guardian_cmd",
    "pdk_cmd",
    "hgs_cmd",
    "hgs_serve_cmd",
    "pipeline_cmd",
    "vtpm_state_cmd",
]

INTERNAL_ERROR = 70


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="templatetool")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def cli(quiet: bool) -> None:
    """Offline shielded-VM templates: VHDX, BitLocker, vTPM sealing, catalogs, shielding data.

    Exit codes: 0 ok, 1 failure, 2 usage, 3 malformed input, 4 integrity/tamper,
    5 credential, 6 policy/preflight, 7 unsupported, 8 I/O or missing tool, 9 not found,
    70 internal error.
    """
    set_quiet(quiet)


def _load() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"templatetool.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"templatetool.cli.{name}":
                continue
            raise
        mod.register(cli)


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _load()
        rv = cli.main(args=args, prog_name="templatetool", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except TemplateToolError as e:
        if _wants_json(args):
            click.echo(json.dumps(e.to_json()))
        click.echo(f"templatetool: {e.kind} error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("templatetool: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("templatetool: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("TEMPLATETOOL_DEBUG"):
            raise
        click.echo(
            f"templatetool: internal error: {type(e).__name__}: {e}; "
            "please report it (TEMPLATETOOL_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(INTERNAL_ERROR)
    sys.exit(0)


if __name__ == "__main__":
    main()
