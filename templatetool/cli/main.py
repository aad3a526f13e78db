"""The templatetool command: a thin click layer over the library.

Each command module in ``templatetool.cli`` exposes ``register(group)``; this module loads them,
applies the output policy (cli/policy.py) to every command, runs the command and turns every
:class:`~templatetool.errors.TemplateToolError` and every click usage error into one line on
stderr (and, with --json, the error document on stdout: docs/cli.md) with its documented exit
code (docs/exit-codes.md). Ctrl-C exits 130. Anything else is an internal error (exit 70)
printed as one line; set TEMPLATETOOL_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while still starting up: nothing written yet, no traceback either
    signal.signal(
        signal.SIGINT,
        lambda _s, _f: (sys.stderr.write("templatetool: interrupted\n"), sys.stderr.flush(), os._exit(130)),
    )

# The CLI owns its process: numpy's bundled OpenBLAS would start one idle thread per core at
# import; we never call BLAS and the disk passes fork workers, so keep it to one thread. Set here,
# before numpy is first imported (the library itself changes no environment variable).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
import importlib
import json
from typing import Any, NoReturn

import click

from .. import __version__
from ..atomic import defer_interrupt
from ..errors import TemplateToolError
from ..parallel import Engine, set_default_engine
from ..progress import set_quiet
from . import policy
from .common import cli_hint, json_default

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
    "linux_cmd",
]

#: The modules that define (or add to) each top-level command. A run loads only the modules of
#: the command it names (each pulls in its part of the library: numpy, lxml, asn1crypto, ...),
#: everything for --help or an unknown name; tests/test_cli_lazy.py checks this table against
#: what the modules register.
COMMAND_OWNERS: dict[str, tuple[str, ...]] = {
    "inspect": ("inspect_cmd",),
    "vhdx": ("vhdx_cmd",),
    "resume": ("bitlocker_cmd",),
    "encrypt": ("bitlocker_cmd",),
    "decrypt": ("bitlocker_cmd",),
    "bitlocker": ("bitlocker_cmd",),
    "tpm": ("tpm_cmd",),
    "vtpm": ("tpm_cmd", "vtpm_state_cmd"),
    "protect": ("catalog_cmd",),
    "vsc": ("catalog_cmd",),
    "cert": ("catalog_cmd",),
    "guardian": ("guardian_cmd",),
    "pdk": ("pdk_cmd",),
    "kp": ("pdk_cmd",),
    "hgs": ("hgs_cmd", "hgs_serve_cmd"),
    "host": ("hgs_cmd",),
    "shield": ("pipeline_cmd",),
    "unlock": ("pipeline_cmd",),
    "escrow": ("pipeline_cmd",),
    "build": ("pipeline_cmd",),
    "demo": ("pipeline_cmd",),
    "luks": ("linux_cmd",),
}

INTERNAL_ERROR = 70
INTERRUPTED = 130


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="templatetool")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def cli(quiet: bool) -> None:
    """Offline shielded-VM templates: VHDX, BitLocker, vTPM sealing, catalogs, shielding data.

    Exit codes: 0 ok, 1 failure, 2 usage, 3 malformed input, 4 integrity/tamper,
    5 credential, 6 policy/preflight, 7 unsupported, 8 I/O or missing tool, 9 not found,
    70 internal error, 130 interrupted (Ctrl-C).
    """
    set_quiet(quiet)
    set_default_engine(Engine.from_env())  # TEMPLATETOOL_WORKERS etc.: read here, nowhere below


_loaded: set[str] = set()


def _modules_for(argv: list[str] | None) -> list[str]:
    """The command modules a run of ``argv`` needs (all of them when ``argv`` is None, names no
    known command, or asks for the top-level help), in :data:`COMMAND_MODULES` order."""
    if argv is None:
        return list(COMMAND_MODULES)
    name = next((a for a in argv if not a.startswith("-")), None)
    owners = COMMAND_OWNERS.get(name) if name is not None else None
    if owners is None:
        return list(COMMAND_MODULES)
    return [m for m in COMMAND_MODULES if m in owners]


def _load(argv: list[str] | None = None) -> None:
    """Register the command modules ``argv`` needs (default: all) and apply the output policy."""
    todo = [m for m in _modules_for(argv) if m not in _loaded]
    if not todo:
        return
    for name in todo:
        _loaded.add(name)
        try:
            mod = importlib.import_module(f"templatetool.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"templatetool.cli.{name}":
                continue
            raise
        mod.register(cli)
    for _path, cmd in policy.walk(cli):
        policy.install(cmd)  # idempotent


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv


def _command_name(argv: list[str]) -> str:
    """The command path named by ``argv`` (``vhdx convert``), for error documents."""
    node: click.Command = cli
    names: list[str] = []
    for a in argv:
        if a.startswith("-"):
            continue
        if not isinstance(node, click.Group) or a not in node.commands:
            break
        node = node.commands[a]
        names.append(a)
    return " ".join(names)


class Interrupted(BaseException):
    """Raised by the SIGINT handler. Not a KeyboardInterrupt, so click does not turn it into an
    Abort (with a blank stderr line), and not an Exception, so no ``except Exception`` swallows it."""


class _Interrupts:
    """SIGINT handling. The first Ctrl-C raises :class:`Interrupted` (after an all-or-nothing step
    when inside one, see atomic.no_interrupts); every cleanup then runs undisturbed: later
    Ctrl-Cs are only recorded, as is one after the command finished. Either way the process
    exits 130 with one line. Where Python would swallow (and print) an exception — a weakref
    callback, ``__del__`` — the raise is retried 2 ms later through SIGALRM."""

    RETRY_S = 0.002

    def __init__(self) -> None:
        self.seen = False  # a Ctrl-C arrived
        self.raised = False  # Interrupted was raised (or deferred)
        self.finishing = False

    @staticmethod
    def _unsafe(frame: Any) -> bool:
        for _ in range(3):
            if frame is None:
                return False
            code = frame.f_code
            if code.co_name == "__del__" or code.co_filename.startswith("<frozen importlib"):
                return True
            frame = frame.f_back
        return False

    def handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self.seen = True
        if not self.seen or self.raised or self.finishing:
            return
        if defer_interrupt(Interrupted()):  # inside an all-or-nothing step: raised at its end
            self.raised = True
            return
        if self._unsafe(frame):
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_S)
            return
        self.raised = True
        raise Interrupted

    def unraisable(self, u: Any) -> None:
        if isinstance(u.exc_value, Interrupted):  # swallowed anyway: raise it again shortly
            self.raised = False
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_S)
            return
        sys.__unraisablehook__(u)

    def install(self) -> None:
        with contextlib.suppress(ValueError):  # not the main thread (embedded use)
            signal.signal(signal.SIGINT, self.handler)
            signal.signal(signal.SIGALRM, self.handler)
            sys.unraisablehook = self.unraisable


def _fail(
    args: list[str],
    kind: str,
    code: int,
    what: str,
    where: str | None = None,
    hint: str | None = None,
    result: Any = None,
) -> NoReturn:
    """Print one error line on stderr (and the --json error document on stdout) and exit ``code``."""
    if _wants_json(args):
        doc: dict[str, Any] = {
            "ok": False,
            "command": _command_name(args),
            "error": {"kind": kind, "exit_code": code, "message": what, "where": where, "hint": hint},
        }
        if result is not None:
            doc["result"] = result
        with contextlib.suppress(Exception):
            click.echo(json.dumps(doc, indent=2, default=json_default))
    line = what + (f" ({where})" if where else "") + (f"; {hint}" if hint else "")
    click.echo(f"templatetool: {kind} error: {' '.join(line.split())}", err=True)
    _exit(code)


#: True when main() runs as the process's entry point (not called in-process by a test or program).
_OWN_PROCESS = False


def _exit(code: int) -> NoReturn:
    if _OWN_PROCESS:
        # The process is about to exit: Python's finalization puts SIGINT back to the default
        # action, and a Ctrl-C landing then would kill the process (status -2, no line) after the
        # command finished. Block it from here on (a pending blocked signal dies with the process);
        # one that already arrived has been reported by the caller.
        with contextlib.suppress(ValueError, OSError):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    sys.exit(code)


def _interrupted() -> NoReturn:
    click.echo("templatetool: interrupted", err=True)
    _exit(INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    global _OWN_PROCESS
    _OWN_PROCESS = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    ints = _Interrupts()
    ints.install()
    code = 0
    try:
        _load(args)
        rv = cli.main(args=args, prog_name="templatetool", standalone_mode=False)
        if isinstance(rv, int) and rv:
            code = rv
        ints.finishing = True
    except BaseException as e:
        ints.finishing = True
        if (
            ints.seen
            or isinstance(e, (KeyboardInterrupt, Interrupted))
            or (isinstance(e, click.exceptions.Abort) and isinstance(e.__context__, KeyboardInterrupt))
        ):
            _interrupted()
        if isinstance(e, TemplateToolError):
            _fail(args, e.kind, e.exit_code, e.what, e.where, cli_hint(e), getattr(e, "result", None))
        if isinstance(e, click.UsageError):
            where = e.ctx.command_path if e.ctx is not None else "templatetool"
            _fail(args, "usage", 2, e.format_message(), where, f"see `{where} --help`")
        if isinstance(e, click.exceptions.Abort):
            _fail(args, "error", 1, "aborted")
        if isinstance(e, click.ClickException):
            _fail(args, "error", e.exit_code, e.format_message())
        if isinstance(e, click.exceptions.Exit):
            code = e.exit_code
        elif isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:
            if os.environ.get("TEMPLATETOOL_DEBUG"):
                raise
            _fail(
                args,
                "internal",
                INTERNAL_ERROR,
                f"{type(e).__name__}: {e}",
                hint="please report it (TEMPLATETOOL_DEBUG=1 shows the traceback)",
            )
    if ints.seen:
        _interrupted()
    _exit(code)


if __name__ == "__main__":
    main()
