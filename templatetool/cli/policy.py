"""The CLI-wide output policy: no command replaces an input or an existing file by accident.

Every click parameter that names a path the command *writes* is declared with one of the param
types below (``OUTPUT_FILE``, ``OUTPUT_DIR``, ``KEY_FOLDER``, ``KEY_PREFIX``); every other
``click.Path`` parameter (and the path-like specs in :data:`SPEC_PARAMS`, e.g. ``--signer
FILE.pfx``) is an input. Outputs a command derives from others (shield's ``OUTPUT.kp``, ``cert
new NAME`` → ``NAME.pfx`` + ``NAME.crt``) are declared with :func:`derived_outputs`.

:func:`install` (run by ``cli/main.py`` on every command) wraps each command's callback so that,
after click has parsed the arguments and *before* any work starts, :func:`check` resolves every
path (symlinks by ``realpath``, hard links by ``os.path.samefile``) and refuses, as a usage error
(exit 2):

* an output that is an input, or an existing file inside an input folder (naming both);
* two outputs that are the same file;
* an existing output file or non-empty output folder, unless ``--overwrite`` (added to every
  command that writes files);
* an existing key folder or key file (``KEY_FOLDER``, ``KEY_PREFIX``), even with
  ``--overwrite``, unless ``--force-replace-keys``.

The outputs themselves are written atomically (templatetool/atomic.py), so ``--overwrite``
replaces a file in one rename.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError

#: Parameters whose string value may name an input file (``FILE.pfx``, ``pem:KEY,CERT``, a file of
#: PCR values, a guardian folder given by path).
SPEC_PARAMS = {"signer", "key_spec", "guardian", "pcr_values", "tpm_pcr_values"}

#: ctx.meta key holding the :class:`Plan` of the running command.
PLAN_KEY = "templatetool.output_plan"


class _Role:
    role = "input"


class OutputFile(_Role, click.Path):
    """A file the command writes (refused when it exists, unless --overwrite)."""

    role = "file"

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("dir_okay", False)
        super().__init__(**kw)


class OutputDir(_Role, click.Path):
    """A folder the command fills (refused when it exists and is not empty, unless --overwrite)."""

    role = "dir"

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("file_okay", False)
        super().__init__(**kw)


class KeyFolder(_Role, click.Path):
    """A folder receiving private keys: never replaced unless --force-replace-keys."""

    role = "key-folder"

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("file_okay", False)
        super().__init__(**kw)


class KeyFile(_Role, click.Path):
    """A private-key file the command writes: never replaced unless --force-replace-keys."""

    role = "key"

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("dir_okay", False)
        super().__init__(**kw)


class OutputPrefix(_Role, click.Path):
    """A name prefix whose derived files (see :func:`derived_outputs`) the command writes."""

    role = "prefix"


OUTPUT_FILE = OutputFile()
OUTPUT_DIR = OutputDir()
KEY_FOLDER = KeyFolder()
OUTPUT_PREFIX = OutputPrefix()
KEY_FILE = KeyFile()

#: Roles of outputs. "resume": an output that may already exist (a crashed run's key file, read back).
#: A derived entry with role "input" is a file the command reads (e.g. named in a build recipe).
OUTPUT_ROLES = {"file", "dir", "key-folder", "key", "resume"}


@dataclass
class Out:
    """One path a command writes: ``label`` (the option, e.g. ``--kp``), ``path`` and ``role``."""

    label: str
    path: str
    role: str = "file"


@dataclass
class Plan:
    """The resolved inputs and outputs of one command invocation (in ``ctx.meta[PLAN_KEY]``)."""

    inputs: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[Out] = field(default_factory=list)
    overwrite: bool = False
    force_replace_keys: bool = False

    def check_late(self, path: str, label: str) -> None:
        """Check an output only known while the command runs (e.g. files extracted from a PDK)."""
        _against_inputs(Out(label, path), self.inputs)
        if os.path.lexists(path) and not self.overwrite:
            raise UsageError(f"{label} exists", path, "choose another folder, or pass --overwrite to replace it")


def derived_outputs(fn: Callable[[dict[str, Any]], Iterable[Out]]) -> Callable[[Any], Any]:
    """Declare outputs a command derives from its parameters: ``fn(params) -> [Out, ...]``.

    Put it directly above the ``def`` (below the click decorators). An ``Out`` whose label equals a
    declared output option's replaces that option's entry (e.g. to mark it ``resume``).
    """

    def deco(f: Any) -> Any:
        f.__templatetool_derived__ = fn
        return f

    return deco


def current_plan() -> Plan | None:
    """The running command's :class:`Plan`, if any."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(PLAN_KEY) if ctx is not None else None


def _label(p: click.Parameter) -> str:
    if isinstance(p, click.Argument):
        return (p.name or "").upper()
    longs = [o for o in p.opts if o.startswith("--")]
    return (longs or p.opts)[0]


def _values(v: Any) -> list[str]:
    if v is None or v is False or v is True:
        return []
    if isinstance(v, (tuple, list)):
        return [str(x) for x in v if x]
    return [str(v)] if str(v) else []


def _spec_paths(text: str) -> list[str]:
    """Files named by a signer/key spec: FILE, pem:KEY,CERT[,CHAIN]; never pkcs11: URIs."""
    if text.startswith("pkcs11:"):
        return []
    if text.startswith("pem:"):
        return [t for t in text[4:].split(",") if t]
    return [text]


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)
    except ValueError:
        return False


def _against_inputs(o: Out, inputs: list[tuple[str, str]]) -> None:
    for ilabel, ipath in inputs:
        if _same(o.path, ipath):
            raise UsageError(
                f"{o.label} {o.path} is also the input {ilabel} {ipath}",
                hint="an output never replaces an input; choose another name",
            )
        if os.path.isdir(ipath) and not os.path.isdir(o.path) and os.path.lexists(o.path) and _inside(o.path, ipath):
            raise UsageError(
                f"{o.label} {o.path} would replace a file inside the input {ilabel} {ipath}",
                hint="write outputs outside input folders",
            )


def _non_empty_dir(path: str) -> bool:
    try:
        return any(os.scandir(path))
    except OSError:
        return False


def plan_for(cmd: click.Command, params: dict[str, Any]) -> Plan:
    """Collect the inputs and outputs of ``cmd`` for the parsed ``params``."""
    plan = Plan()
    for p in cmd.params:
        if p.name is None or p.name not in params:
            continue
        vals = _values(params[p.name])
        role = getattr(p.type, "role", None)
        if role in ("file", "dir", "key-folder", "key"):
            plan.outputs += [Out(_label(p), v, role) for v in vals]
        elif role == "prefix":
            continue  # its files come from derived_outputs
        elif isinstance(p.type, click.Path):
            plan.inputs += [(_label(p), v) for v in vals]
        elif p.name in SPEC_PARAMS:
            plan.inputs += [(_label(p), f) for v in vals for f in _spec_paths(v) if os.path.exists(f)]
    derive = getattr(cmd.callback, "__templatetool_derived__", None)
    if derive is not None:
        for d in derive(params):
            if d.role == "input":  # a file the command reads, named inside another input (a recipe)
                plan.inputs.append((d.label, d.path))
                continue
            for i, o in enumerate(plan.outputs):
                if o.label == d.label:
                    plan.outputs[i] = d
                    break
            else:
                plan.outputs.append(d)
    return plan


def check(plan: Plan) -> None:
    """Refuse clashes and existing destinations (see the module docstring); raises UsageError."""
    for i, o in enumerate(plan.outputs):
        _against_inputs(o, plan.inputs)
        for o2 in plan.outputs[:i]:
            if _same(o.path, o2.path):
                raise UsageError(
                    f"{o.label} {o.path} is also {o2.label} {o2.path}", hint="give each output its own name"
                )
    for o in plan.outputs:
        if not os.path.lexists(o.path):
            continue
        if o.role == "key-folder":
            if not os.path.isdir(o.path):
                raise UsageError(f"{o.label} exists and is not a folder", o.path, "choose a new folder")
            if _non_empty_dir(o.path) and not plan.force_replace_keys:
                raise UsageError(
                    f"{o.label} {o.path} exists and holds files; key folders are never overwritten",
                    o.path,
                    "choose a new folder (--force-replace-keys replaces its keys: the old "
                    "keys are lost; --overwrite does not)",
                )
        elif o.role == "key":
            if not plan.force_replace_keys:
                raise UsageError(
                    f"{o.label} exists; key files are never overwritten",
                    o.path,
                    "choose another name (--force-replace-keys replaces it: the old key is lost; --overwrite does not)",
                )
        elif o.role == "dir":
            if not os.path.isdir(o.path):
                raise UsageError(f"{o.label} exists and is not a folder", o.path, "choose a new folder")
            if _non_empty_dir(o.path) and not plan.overwrite:
                raise UsageError(
                    f"{o.label} exists and is not empty",
                    o.path,
                    "choose a new folder, or pass --overwrite to replace its files",
                )
        elif o.role == "file":
            if os.path.isdir(o.path):
                raise UsageError(f"{o.label} is a folder, a file name was expected", o.path)
            if not plan.overwrite:
                raise UsageError(f"{o.label} exists", o.path, "choose another name, or pass --overwrite to replace it")


_OVERWRITE_HELP = "Replace existing output files (atomically); never an input, never key files."
_FORCE_HELP = "Replace an existing key folder / key files (the old private keys are lost)."


def install(cmd: click.Command) -> None:
    """Apply the output policy to ``cmd``: add --overwrite / --force-replace-keys where it writes
    files and check every invocation before its callback runs. Idempotent."""
    if cmd.callback is None or getattr(cmd.callback, "__templatetool_policy__", False):
        return
    roles = {getattr(p.type, "role", None) for p in cmd.params}
    derive = getattr(cmd.callback, "__templatetool_derived__", None)
    if not (roles & {"file", "dir", "key-folder", "key", "prefix"}) and derive is None:
        return
    names = {p.name for p in cmd.params}
    accepted = set(inspect.signature(cmd.callback).parameters)
    injected: set[str] = set()
    if "overwrite" not in names:
        cmd.params.append(click.Option(["--overwrite"], is_flag=True, help=_OVERWRITE_HELP))
        injected.add("overwrite")
    keyish = roles & {"key-folder", "key", "prefix"} or getattr(cmd.callback, "__templatetool_keys__", False)
    if keyish and "force_replace_keys" not in names:
        cmd.params.append(click.Option(["--force-replace-keys"], is_flag=True, help=_FORCE_HELP))
        injected.add("force_replace_keys")
    orig = cmd.callback

    @functools.wraps(orig)
    def wrapped(**kw: Any) -> Any:
        ctx = click.get_current_context()
        plan = plan_for(cmd, kw)
        plan.overwrite = bool(kw.get("overwrite"))
        plan.force_replace_keys = bool(kw.get("force_replace_keys"))
        check(plan)
        ctx.meta[PLAN_KEY] = plan
        for name in injected - accepted:
            kw.pop(name, None)
        return orig(**kw)

    wrapped.__templatetool_policy__ = True  # type: ignore[attr-defined]
    cmd.callback = wrapped


def keys_command(f: Any) -> Any:
    """Mark a command as writing private keys (it gets --force-replace-keys)."""
    f.__templatetool_keys__ = True
    return f


def walk(group: click.Command, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], click.Command]]:
    """Every (command path, leaf command) under ``group``."""
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            yield from walk(sub, (*path, name))
    else:
        yield path, group


def converting(disk: str | None) -> bool:
    """True when ``disk`` is mid in-place conversion (a resume may re-read its key files)."""
    if not disk or not os.path.isfile(disk):
        return False
    from ..bitlocker import refuse_if_converting
    from ..errors import TemplateToolError

    try:
        refuse_if_converting(disk, None)
    except UsageError:
        return True
    except TemplateToolError:
        return False
    return False


def beside(path: str, suffix: str) -> str:
    """``path`` with its suffix replaced (``vm.vhdx`` → ``vm.kp``), as the pipeline derives it."""
    return str(Path(path).with_suffix(suffix))
