"""The CLI loads only the command modules of the command it runs (startup cost: every command
pays it, and the bench compares whole runs with qemu-img). The table of owners must match what
the modules really register, and a disk command must not pull in the XML / CMS / service parts."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
import pytest

from templatetool.cli import main as cli_main
from templatetool.cli import policy

from .conftest import run_cli


def _fresh(modules: list[str]) -> click.Group:
    @click.group()
    def g() -> None:
        pass

    for name in modules:
        importlib.import_module(f"templatetool.cli.{name}").register(g)
    return g


def test_owner_table_matches_what_the_modules_register() -> None:
    """Every top-level command is in the table; loading only its owners gives all its subcommands."""
    full = _fresh(list(cli_main.COMMAND_MODULES))
    assert set(full.commands) == set(cli_main.COMMAND_OWNERS), "a top-level command is missing from COMMAND_OWNERS"
    for name in full.commands:
        mods = cli_main._modules_for([name, "--help"])
        part = _fresh(mods)
        want = sorted(p for p, _ in policy.walk(full.commands[name]))
        got = sorted(p for p, _ in policy.walk(part.commands[name])) if name in part.commands else None
        assert got == want, f"{name}: loading {mods} gives {got}, the full CLI {want}"


@pytest.mark.parametrize(("argv", "absent"), [
    (["encrypt", "--help"], ["lxml", "asn1crypto", "tqdm", "templatetool.hgs", "templatetool.cli.pdk_cmd"]),
    (["-q", "decrypt", "--help"], ["lxml", "asn1crypto", "tqdm", "templatetool.cli.guardian_cmd"]),
    (["vhdx", "--help"], ["numpy", "lxml", "tqdm", "templatetool.cli.bitlocker_cmd"]),
])
def test_a_command_imports_only_its_part(argv: list[str], absent: list[str]) -> None:
    code = ("import sys, json\nfrom templatetool.cli import main as M\nM._load(json.loads(sys.argv[1]))\n"
            "print(json.dumps(sorted(sys.modules)))")
    cp = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, check=True)
    mods = set(json.loads(cp.stdout))
    assert not [m for m in absent if m in mods], sorted(m for m in absent if m in mods)


def test_unknown_command_and_top_help_still_list_everything() -> None:
    cp = run_cli("--help")
    assert cp.returncode == 0
    for name in cli_main.COMMAND_OWNERS:
        assert f"  {name} " in cp.stdout or f"  {name}\n" in cp.stdout, name
    cp = run_cli("encrpyt", "x")
    assert cp.returncode == 2 and "encrpyt" in cp.stderr, cp.stderr


def test_two_commands_in_one_process_both_work() -> None:
    """main() called again in one process (an embedding program, the tests' in-process runner)
    loads what the second command needs and applies the output policy once (no doubled option)."""
    code = (
        "import contextlib, io, sys\nfrom templatetool.cli import main as M\nouts = []\n"
        "for argv in (['vhdx', '--help'], ['encrypt', '--help'], ['vhdx', 'convert', '--help']):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "        M.main(argv)\n"
        "    outs.append(buf.getvalue())\n"
        "print('\\n=====\\n'.join(outs))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    vhdx, enc, conv = cp.stdout.split("\n=====\n")
    assert "convert" in vhdx and "--recovery-password-out" in enc, cp.stdout
    assert enc.count("--overwrite") == 1 and conv.count("--overwrite") == 1, cp.stdout
