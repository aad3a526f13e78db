"""Log replay into a copy, judged against qemu-img's own replay (`qemu-img check -r all`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_clean_error, require_tool, run_cli
from test_vhdx_interop import pyvhdi_read, qemu_check
from vhdx_corpus import make_dirty_log

from templatetool.errors import UnsupportedError
from templatetool.vhdx import check, open_vhdx, replay_log

MiB = 1 << 20


@pytest.mark.parametrize("maker", ["qemu", "ours"])
def test_replay_matches_qemu(tmp_path: Path, maker: str) -> None:
    require_tool("qemu-img", "qemu-io")
    dirty = tmp_path / "dirty.vhdx"
    if maker == "qemu":
        subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=1M",
                        str(dirty), "8M"], check=True)
        subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 4k",
                        "-c", "write -P 0x33 7M 512", str(dirty)], check=True, capture_output=True)
    else:
        from vhdx_corpus import make_base

        make_base(dirty)
    expected = make_dirty_log(dirty)
    before = dirty.read_bytes()

    with pytest.raises(UnsupportedError, match="unreplayed"):
        open_vhdx(dirty)
    assert_clean_error(run_cli("vhdx", "convert", str(dirty), str(tmp_path / "x.raw")), 7)

    ours = tmp_path / "ours.vhdx"
    res = replay_log(dirty, ours)
    assert res["sequence"] == [10, 11]
    assert dirty.read_bytes() == before  # the source is untouched
    with open_vhdx(ours) as d:
        assert d.read(0, d.size) == expected
    assert [f for f in check(ours) if f.severity == "error"] == []
    qemu_check(ours)
    assert pyvhdi_read(ours) == expected

    # qemu's replay of the same file gives the same disk
    theirs = tmp_path / "theirs.vhdx"
    shutil.copyfile(dirty, theirs)
    cp = subprocess.run(["qemu-img", "check", "-r", "all", str(theirs)], check=False, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    raw = tmp_path / "theirs.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(theirs), str(raw)], check=True)
    assert raw.read_bytes() == expected

    # CLI
    cli_out = tmp_path / "cli.vhdx"
    cp = run_cli("vhdx", "replay-log", str(dirty), str(cli_out), "--json")
    assert cp.returncode == 0, cp.stderr
    with open_vhdx(cli_out) as d:
        assert d.read(0, d.size) == expected
