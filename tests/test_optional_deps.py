"""libvhdi-python and python-pkcs11 are optional extras (``templatetool[vhdi]``, ``templatetool[pkcs11]``):
nothing imports them at module level, and without them the one feature that needs each fails through
the CLI with a ResourceError (exit 8) naming the extra to install. The missing module is simulated
with ``sys.modules[name] = None`` (what ``import name`` then refuses with ImportError)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_inprocess

from templatetool.vhdx import create_vhdx

MiB = 1 << 20


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error message"
    assert "Traceback" not in err, err
    return lines[-1]


def test_pkcs11_signer_without_python_pkcs11(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pkcs11", None)
    monkeypatch.setenv("TEMPLATETOOL_PKCS11_PIN", "1234")
    golden = tmp_path / "golden.img"
    golden.write_bytes(bytes(MiB))
    module = tmp_path / "libtoken.so"  # never loaded: the import fails first
    module.write_bytes(b"")
    code, _, err = run_inprocess(capsys, "protect", golden, "-o", tmp_path / "t.vhdx", "--name", "T",
                                 "--version", "1.0.0.0", "--signer",
                                 f"pkcs11:token=t;object=k?module-path={module}")
    line = _last_line(err)
    assert code == 8, err
    assert line.startswith("templatetool: resource error:"), line
    assert "python-pkcs11" in line and "pip install 'templatetool[pkcs11]'" in line, line
    assert not (tmp_path / "t.vhdx").exists()


def test_cross_check_without_libvhdi(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "d.vhdx"
    create_vhdx(disk, 4 * MiB, block_size=MiB).close()
    code, _, err = run_inprocess(capsys, "vhdx", "check", disk)  # the plain check needs no extra
    assert code == 0, err
    monkeypatch.setitem(sys.modules, "pyvhdi", None)
    code, _, err = run_inprocess(capsys, "vhdx", "check", "--cross-check", disk)
    line = _last_line(err)
    assert code == 8, err
    assert line.startswith("templatetool: resource error:"), line
    assert "libvhdi" in line and "pip install 'templatetool[vhdi]'" in line, line


def test_no_module_level_import_of_optional_extras() -> None:
    """Importing every templatetool module (the CLI included) loads neither optional module."""
    code = (
        "import pkgutil, sys, importlib, templatetool\n"
        "for m in pkgutil.walk_packages(templatetool.__path__, 'templatetool.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in ('pkcs11', 'pyvhdi') if n in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=Path(__file__).resolve().parents[1])
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == "", f"imported at module level: {cp.stdout.strip()}"
