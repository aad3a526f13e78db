"""Shared test fixtures: tool requirements, paths, the golden disk, CLI runner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
GOLDEN = FIXTURES / "golden.vhdx"
#: Windows-made BitLocker samples (AGPL test data) live beside the project, never inside it.
SAMPLES = Path(os.environ.get("TEMPLATETOOL_SAMPLES", ROOT.parent / "shared" / "samples"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


#: In CI (TEMPLATETOOL_CI or CI set) a missing tool, module or samples folder fails instead of skipping.
IN_CI = _env_flag("TEMPLATETOOL_CI") or _env_flag("CI")


def require_tool(*names: str) -> None:
    """Skip (locally) or fail (in CI) when an external tool is missing."""
    for name in names:
        if shutil.which(name) is None:
            msg = f"needs external tool {name!r} (install the Debian packages: make deps)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)


def require_module(name: str):
    """Import a Python module or skip/fail like require_tool."""
    try:
        return __import__(name)
    except ImportError as e:
        msg = f"needs Python module {name!r}: {e}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def require_samples(sub: str = "bitlocker") -> Path:
    """Path of a shared samples folder; skip locally when absent, fail in CI (it always has them)."""
    p = SAMPLES / sub
    if not p.is_dir():
        msg = f"samples folder {p} is absent (AGPL test data kept outside the repo, in ../shared/samples)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the templatetool CLI in a subprocess; returns the CompletedProcess (text mode)."""
    e = dict(os.environ)
    e.pop("TEMPLATETOOL_DEBUG", None)
    if env:
        e.update(env)
    cp = subprocess.run([sys.executable, "-m", "templatetool.cli.main", *args], capture_output=True,
                        text=True, env=e, input=input.decode() if input else None, cwd=str(ROOT))
    if check and cp.returncode != 0:
        raise AssertionError(f"templatetool {' '.join(args)} failed ({cp.returncode}): {cp.stderr}")
    return cp


def run_inprocess(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run the CLI in this process (fast); returns (exit code, stdout, stderr). The CLI's SIGINT /
    SIGALRM handlers and unraisable hook are restored afterwards."""
    from templatetool.cli import main as cli_main

    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGALRM), sys.unraisablehook
    try:
        with pytest.raises(SystemExit) as ex:
            cli_main.main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGALRM, old[1])
        sys.unraisablehook = old[2]
    out = capsys.readouterr()
    return int(ex.value.code or 0), out.out, out.err


def assert_clean_error(cp: subprocess.CompletedProcess[str], code: int | None = None) -> None:
    """A failed CLI run must exit non-zero with one clear line and no traceback."""
    assert cp.returncode != 0, cp.stdout
    assert cp.returncode != 70, f"internal error: {cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) >= 1, "no error message"
    assert lines[-1].startswith("templatetool:") or lines[-1].startswith("Error:"), cp.stderr
    if code is not None:
        assert cp.returncode == code, cp.stderr


@pytest.fixture
def golden() -> Path:
    """The golden template disk from fixtures/ (read-only: copy before modifying)."""
    if not GOLDEN.exists():
        pytest.fail("fixtures/golden.vhdx missing: run fixtures/make_golden.sh")
    return GOLDEN


@pytest.fixture(scope="session")
def guest_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The Linux test guest's reference boot (tests/linux_guest_support.py), once per session."""
    from .linux_guest_support import reference_boot

    return reference_boot(tmp_path_factory.mktemp("guest-reference"))
