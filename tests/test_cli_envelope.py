"""The CLI surface (issue 17): one --json envelope for every command (docs/cli.md), click's own
usage errors through the same error path, and option hygiene (help text everywhere, VAR for
every environment-variable option)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from templatetool.cli import main as cli_main
from templatetool.cli import policy

from .conftest import GOLDEN, ROOT, run_cli, run_inprocess

ERROR_KEYS = {"kind", "exit_code", "message", "where", "hint"}
#: Commands without --json: raw bytes on stdout, a long-running server.
NO_JSON = {"vhdx metadata get", "hgs serve"}


def _commands() -> list[tuple[str, click.Command]]:
    cli_main._load()
    return [(" ".join(p), c) for p, c in policy.walk(cli_main.cli)]


def test_every_option_has_help_and_env_options_say_var() -> None:
    problems = []
    for name, cmd in _commands():
        assert cmd.help, f"{name}: no docstring"
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            if not p.help:
                problems.append(f"{name} {p.opts[0]}: no help")
            if any(o.endswith("-env") for o in p.opts) and p.metavar != "VAR":
                problems.append(f"{name} {p.opts[0]}: metavar {p.metavar!r}, not VAR")
    assert not problems, "\n".join(problems)


def test_every_command_has_json() -> None:
    missing = [n for n, c in _commands() if n not in NO_JSON and not any(p.name == "as_json" for p in c.params)]
    assert not missing



def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_inprocess(capsys, *args)


def check_error(rc: int, out: str, err: str, command: str, code: int) -> dict:
    assert rc == code, (rc, err)
    assert err.count("\n") == 1 and err.startswith("templatetool: ") and " error: " in err, err
    doc = json.loads(out)
    assert doc["ok"] is False and doc["command"] == command and set(doc["error"]) == ERROR_KEYS, doc
    assert doc["error"]["exit_code"] == code and doc["error"]["message"] in err
    return doc


@pytest.mark.parametrize("name", [n for n, _c in _commands() if n not in NO_JSON])
def test_failure_envelope_for_every_command(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option is a usage error: exit 2, one stderr line, the JSON error document."""
    rc, out, err = run(capsys, *name.split(), "--json", "--no-such-option")
    doc = check_error(rc, out, err, name, 2)
    assert doc["error"]["kind"] == "usage" and "--no-such-option" in doc["error"]["message"]
    assert "--help" in doc["error"]["hint"]


@pytest.mark.parametrize("argv,command,code", [
    (["vhdx", "convert", "{tmp}/a.raw"], "vhdx convert", 2),                    # missing argument
    (["vsc", "export", "{golden}"], "vsc export", 2),                           # missing -o
    (["vhdx", "create", "{tmp}/x.vhdx", "--size", "8M", "--subformat", "bogus"], "vhdx create", 2),  # bad choice
    (["shield"], "shield", 2),
    (["inspect", "{tmp}/missing.vhdx"], "inspect", 9),
    (["vsc", "show", "{golden}"], "vsc show", 9),
    (["tpm", "show", "{root}/pyproject.toml"], "tpm show", 3),
])
def test_usage_and_typed_errors(argv: list[str], command: str, code: int, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(tmp=tmp_path, golden=GOLDEN, root=ROOT) for a in argv]
    rc, out, err = run(capsys, *args, "--json")
    check_error(rc, out, err, command, code)
    rc, out, err = run(capsys, *args)  # without --json: the line only
    assert rc == code and out == "" and err.count("\n") == 1


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "no-such-command")
    assert rc == 2 and err.startswith("templatetool: usage error: ") and err.count("\n") == 1, err


def test_success_envelope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Success documents: {"ok": true, "command", "result"}; the same key for the same thing."""
    cases = [
        (["inspect", str(GOLDEN)], "inspect"),
        (["vhdx", "create", str(tmp_path / "n.vhdx"), "--size", "8M"], "vhdx create"),
        (["vhdx", "check", str(tmp_path / "n.vhdx")], "vhdx check"),
        (["vhdx", "convert", str(tmp_path / "n.vhdx"), str(tmp_path / "n.raw")], "vhdx convert"),
        (["vhdx", "metadata", "list", str(tmp_path / "n.vhdx")], "vhdx metadata list"),
        (["bitlocker", "info", str(GOLDEN)], "bitlocker info"),
    ]
    for argv, command in cases:
        rc, out, err = run(capsys, *argv, "--json")
        if command == "bitlocker info":  # the golden disk is not encrypted: a typed failure document
            check_error(rc, out, err, command, json.loads(out)["error"]["exit_code"])
            continue
        assert rc == 0, err
        doc = json.loads(out)
        assert set(doc) == {"ok", "command", "result"} and doc["ok"] is True and doc["command"] == command, doc
    rc, out, _err = run(capsys, "vhdx", "convert", str(tmp_path / "n.vhdx"), str(tmp_path / "m.vhdx"), "--json")
    r = json.loads(out)["result"]
    assert r["output"] == str(tmp_path / "m.vhdx") and isinstance(r["size"], int)
    rc, out, _err = run(capsys, "vhdx", "create", str(tmp_path / "o.vhdx"), "--size", "8M", "--json")
    assert json.loads(out)["result"]["output"] == str(tmp_path / "o.vhdx")


def test_failure_report_travels_in_the_error_document(tmp_path: Path) -> None:
    """A failed check keeps its report: {"ok": false, "error": {...}, "result": {...}}."""
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(b"vhdxfile" + b"\0" * (1 << 20))
    cp = run_cli("vhdx", "check", str(bad), "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 4 and doc["ok"] is False and doc["error"]["kind"] == "integrity"
    assert doc["result"]["findings"] and cp.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("envelope") / "demo"
    cp = run_cli("demo", "-o", str(d), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["ok"] is True and doc["command"] == "demo" and doc["result"]["ok"] is True
    return d


@pytest.mark.parametrize("dry", [True, False])
def test_unlock_failure_says_why_on_stderr(demo: Path, tmp_path: Path, dry: bool) -> None:
    """unlock given the PDK as --kp (dry run or real) fails with one stderr line, its typed exit
    code and, with --json, the error document carrying the step report (the dry run used to exit
    3 with nothing on stderr)."""
    mode = ["--dry-run"] if dry else ["-o", str(tmp_path / "dec.vhdx")]
    args = ["unlock", str(demo / "vm.vhdx"), "--kp", str(demo / "tenant.pdk"), "--guardian", str(demo / "fabric"),
            "--host", str(demo / "host"), *mode]
    cp = run_cli(*args)
    assert cp.returncode == 3, cp.stderr
    assert cp.stderr.startswith("templatetool: format error: ") and cp.stderr.count("\n") == 1, cp.stderr
    assert "key protector" in cp.stderr and "Traceback" not in cp.stderr
    cp = run_cli(*args, "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 3 and doc["ok"] is False and doc["error"]["kind"] == "format"
    assert cp.stderr.count("\n") == 1
    if dry:
        steps = {s["step"]: s["status"] for s in doc["result"]["steps"]}
        assert steps["attestation"] == "passed" and steps["key release"] == "failed"
    assert not (tmp_path / "dec.vhdx").exists()


def test_unlock_real_envelope(demo: Path, tmp_path: Path) -> None:
    cp = run_cli("unlock", str(demo / "vm.vhdx"), "--kp", str(demo / "vm.kp"), "--guardian", str(demo / "fabric"),
                 "--host", str(demo / "host"), "-o", str(tmp_path / "dec.vhdx"), "--json")
    doc = json.loads(cp.stdout)
    assert cp.returncode == 0 and doc["ok"] is True and doc["command"] == "unlock", cp.stderr
    assert doc["result"]["output"] == str(tmp_path / "dec.vhdx")
