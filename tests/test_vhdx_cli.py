"""The `templatetool vhdx` commands end to end (subprocess), judged by qemu-img and pyvhdi."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

from conftest import assert_clean_error, require_tool, run_cli
from test_vhdx_interop import make_raw, pyvhdi_read, qemu_check

from templatetool.vhdx import create_vhdx, open_vhdx

MiB = 1 << 20


def test_convert_create_check_metadata(tmp_path: Path) -> None:
    require_tool("qemu-img")
    raw = tmp_path / "in.img"
    expected = make_raw(raw, 16 * MiB, seed=11)
    out = tmp_path / "out.vhdx"
    cp = run_cli("vhdx", "convert", str(raw), str(out), "--block-size", "2M", "--json")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)["result"]
    assert res["format"] == "vhdx" and res["subformat"] == "dynamic" and res["virtual_size"] == 16 * MiB
    qemu_check(out)
    assert pyvhdi_read(out) == expected
    # fixed, then back to raw by suffix
    fixed = tmp_path / "fixed.vhdx"
    assert run_cli("vhdx", "convert", str(out), str(fixed), "--subformat", "fixed").returncode == 0
    qemu_check(fixed)
    back = tmp_path / "back.img"
    cp = run_cli("vhdx", "convert", str(fixed), str(back))
    assert cp.returncode == 0, cp.stderr
    assert back.read_bytes() == expected
    # --to overrides the suffix
    odd = tmp_path / "odd.bin"
    assert run_cli("vhdx", "convert", str(raw), str(odd), "--to", "vhdx").returncode == 0
    assert odd.read_bytes()[:8] == b"vhdxfile"

    # check: clean, JSON, cross-check
    cp = run_cli("vhdx", "check", str(out), "--cross-check", "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["ok"] is True

    # create + differencing child + metadata
    base = tmp_path / "base.vhdx"
    cp = run_cli("vhdx", "create", str(base), "--size", "32M", "--block-size", "1M",
                 "--logical-sector-size", "4096", "--json")
    assert cp.returncode == 0, cp.stderr
    info = json.loads(cp.stdout)["result"]
    assert info["logical_sector_size"] == 4096 and info["virtual_size"] == 32 * MiB
    child = tmp_path / "child.avhdx"
    cp = run_cli("vhdx", "create", str(child), "--parent", str(base))
    assert cp.returncode == 0, cp.stderr
    with open_vhdx(child) as c:
        assert c.subformat == "differencing" and c.parent_chain()[0].resolve() == base.resolve()
    item = tmp_path / "item.bin"
    item.write_bytes(os.urandom(5000))
    gid = str(uuid.uuid4())
    assert run_cli("vhdx", "metadata", "set", str(out), gid, str(item)).returncode == 0
    cp = run_cli("vhdx", "metadata", "list", str(out), "--json")
    assert json.loads(cp.stdout)["result"] == [{"guid": gid, "size": 5000, "virtual_disk": True}]
    got = tmp_path / "got.bin"
    assert run_cli("vhdx", "metadata", "get", str(out), gid, "-o", str(got)).returncode == 0
    assert got.read_bytes() == item.read_bytes()
    qemu_check(out)
    assert pyvhdi_read(out) == expected
    assert run_cli("vhdx", "metadata", "remove", str(out), gid).returncode == 0
    assert_clean_error(run_cli("vhdx", "metadata", "get", str(out), gid), 9)


def test_cli_usage_errors(tmp_path: Path) -> None:
    assert_clean_error(run_cli("vhdx", "check", str(tmp_path / "nope.vhdx")), 9)
    assert_clean_error(run_cli("vhdx", "convert", str(tmp_path / "nope.img"), str(tmp_path / "x.vhdx")), 9)
    assert_clean_error(run_cli("vhdx", "create", str(tmp_path / "a.vhdx")), 2)  # no --size
    assert_clean_error(run_cli("vhdx", "create", str(tmp_path / "a.vhdx"), "--size", "1000"), 2)  # not 512-multiple
    assert_clean_error(run_cli("vhdx", "create", str(tmp_path / "a.vhdx"), "--size", "8M", "--block-size", "3M"), 2)
    assert_clean_error(run_cli("vhdx", "create", str(tmp_path / "a.vhdx"), "--size", "8M",
                               "--parent", str(tmp_path / "missing.vhdx")), 9)
    assert not list(tmp_path.iterdir())


def test_check_reports_corruption_with_exit_4(tmp_path: Path) -> None:
    require_tool("qemu-img")
    raw = tmp_path / "in.img"
    make_raw(raw, 8 * MiB, seed=5)
    v = tmp_path / "v.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M",
                    str(raw), str(v)], check=True)
    assert run_cli("vhdx", "check", str(v)).returncode == 0
    os.truncate(v, os.path.getsize(v) - MiB)  # chop the last data block
    cp = run_cli("vhdx", "check", str(v))
    assert_clean_error(cp, 4)
    assert "past the end of the file" in cp.stdout
    cp = run_cli("vhdx", "check", str(v), "--json")
    assert cp.returncode == 4
    assert json.loads(cp.stdout)["ok"] is False


def test_convert_differencing_with_moved_parent(tmp_path: Path) -> None:
    parent = tmp_path / "a" / "p.vhdx"
    parent.parent.mkdir()
    with create_vhdx(parent, 4 * MiB, block_size=MiB) as p:
        p.write(0, b"P" * 10000)
    child = tmp_path / "c.vhdx"
    with create_vhdx(child, None, parent=parent) as c:
        c.write(5000, b"C" * 100)
    moved = tmp_path / "b"
    moved.mkdir()
    os.replace(parent, moved / "p.vhdx")
    out = tmp_path / "flat.raw"
    cp = run_cli("vhdx", "convert", str(child), str(out))
    assert_clean_error(cp, 9)
    assert str(parent) in cp.stderr and not out.exists()
    cp = run_cli("vhdx", "convert", str(child), str(out), "--parent-dir", str(moved))
    assert cp.returncode == 0, cp.stderr
    expect = bytearray(4 * MiB)
    expect[:10000] = b"P" * 10000
    expect[5000:5100] = b"C" * 100
    assert out.read_bytes() == bytes(expect)
