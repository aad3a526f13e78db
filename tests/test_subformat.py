"""Issue 17: protect and shield keep a fixed VHDX fixed (default: the input's subformat);
``--subformat fixed|dynamic`` chooses. Judged by libvhdi (pyvhdi) and our own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import GOLDEN, assert_clean_error, require_module, run_cli

#: libvhdi disk types
FIXED, DYNAMIC = 2, 3


def _disk_type(path: Path) -> int:
    pyvhdi = require_module("pyvhdi")
    f = pyvhdi.file()
    f.open(str(path))
    try:
        return int(f.get_disk_type())
    finally:
        f.close()


def _ours(path: Path) -> str:
    from templatetool.vhdx import open_vhdx

    with open_vhdx(path) as d:
        return str(d.subformat)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from templatetool.pipeline.demo import run_demo

    d = tmp_path_factory.mktemp("subfmt")
    run_demo(GOLDEN, d / "demo", say=lambda s: None)
    fixed = d / "golden-fixed.vhdx"
    cp = run_cli("-q", "vhdx", "convert", str(GOLDEN), str(fixed), "--subformat", "fixed")
    assert cp.returncode == 0, cp.stderr
    assert _disk_type(fixed) == FIXED
    return {"dir": d, "demo": d / "demo", "fixed": fixed}


def _protect(s: dict[str, Path], src: Path, out: Path, *extra: str) -> None:
    demo = s["demo"]
    cp = run_cli("-q", "protect", str(src), "-o", str(out), "--name", "WindowsServer2025-Datacenter",
                 "--version", "10.0.26100.2", "--signer", f"pem:{demo / 'signer.key.pem'},{demo / 'signer.pem'}",
                 *extra)
    assert cp.returncode == 0, cp.stderr


def test_protect_keeps_fixed_and_converts_on_request(setup: dict[str, Path], tmp_path: Path) -> None:
    _protect(setup, setup["fixed"], tmp_path / "t-fixed.vhdx")
    assert _disk_type(tmp_path / "t-fixed.vhdx") == FIXED and _ours(tmp_path / "t-fixed.vhdx") == "fixed"
    _protect(setup, setup["fixed"], tmp_path / "t-dyn.vhdx", "--subformat", "dynamic")
    assert _disk_type(tmp_path / "t-dyn.vhdx") == DYNAMIC
    # a dynamic input stays dynamic; --subformat fixed makes it fixed
    _protect(setup, GOLDEN, tmp_path / "g-dyn.vhdx")
    assert _disk_type(tmp_path / "g-dyn.vhdx") == DYNAMIC
    _protect(setup, GOLDEN, tmp_path / "g-fixed.vhdx", "--subformat", "fixed")
    assert _disk_type(tmp_path / "g-fixed.vhdx") == FIXED
    # same catalog, whatever the container: the volume is what is signed
    vf = run_cli("vsc", "verify", str(tmp_path / "g-fixed.vhdx"), "--trust", str(setup["demo"] / "signer.pem"))
    assert vf.returncode == 0, vf.stdout + vf.stderr


def test_subformat_for_a_raw_output_is_a_usage_error(setup: dict[str, Path], tmp_path: Path) -> None:
    demo = setup["demo"]
    cp = run_cli("protect", str(GOLDEN), "-o", str(tmp_path / "t.img"), "--name", "N", "--version", "1.0.0.0",
                 "--signer", f"pem:{demo / 'signer.key.pem'},{demo / 'signer.pem'}", "--subformat", "fixed")
    assert_clean_error(cp, 2)
    assert not list(tmp_path.iterdir())


def test_shield_keeps_fixed_and_converts_on_request(setup: dict[str, Path], tmp_path: Path) -> None:
    demo = setup["demo"]
    tmpl = tmp_path / "t-fixed.vhdx"
    _protect(setup, setup["fixed"], tmpl)

    def shield(out: Path, *extra: str) -> None:
        cp = run_cli("-q", "shield", str(tmpl), "--pdk", str(demo / "tenant.pdk"), "--owner", str(demo / "owner"),
                     "--guardian", str(demo / "fabric"), "-o", str(out), "--tcg-log", str(demo / "vm-reference.tcglog"),
                     *extra)
        assert cp.returncode == 0, cp.stderr

    shield(tmp_path / "vm-fixed.vhdx")
    assert _disk_type(tmp_path / "vm-fixed.vhdx") == FIXED and _ours(tmp_path / "vm-fixed.vhdx") == "fixed"
    shield(tmp_path / "vm-dyn.vhdx", "--subformat", "dynamic")
    assert _disk_type(tmp_path / "vm-dyn.vhdx") == DYNAMIC
    # the fixed VM disk still unlocks (dry run through the whole chain)
    cp = run_cli("unlock", str(tmp_path / "vm-fixed.vhdx"), "--kp", str(tmp_path / "vm-fixed.kp"), "--guardian",
                 str(demo / "fabric"), "--host", str(demo / "host"), "--dry-run")
    assert cp.returncode == 0, cp.stdout + cp.stderr
