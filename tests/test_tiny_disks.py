"""An empty or sub-sector file is malformed input: every disk command refuses it alike (exit 3)."""

from __future__ import annotations

import hashlib
import os

import pytest

from templatetool.disk import open_disk
from templatetool.errors import FormatError
from templatetool.vhdx.check import check

from .conftest import run_cli

MIN_DISK_BYTES = 512  # one sector

COMMANDS = [
    ("inspect",),
    ("vhdx", "check"),
    ("decrypt", "--clear-key", "-o", "{out}"),
    ("bitlocker", "info"),
    ("vsc", "verify"),
    ("vhdx", "convert", "{out}"),  # DST after SRC: see the argument order below
]


@pytest.fixture(params=[0, 100], ids=["empty", "100B"])
def tiny(request, tmp_path):
    size = request.param
    for suffix in (".vhdx", ".img"):
        p = tmp_path / f"tiny{suffix}"
        p.write_bytes(os.urandom(size))
    return tmp_path, size


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
@pytest.mark.parametrize("suffix", [".vhdx", ".img"])
def test_tiny_file_is_a_format_error_everywhere(tiny, cmd, suffix):
    folder, size = tiny
    path = folder / f"tiny{suffix}"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = folder / "out.img"
    args = [a.format(out=out) for a in cmd]
    if cmd[:2] == ("vhdx", "convert"):
        args = ["vhdx", "convert", str(path), str(out)]
    else:
        args.append(str(path))
    cp = run_cli(*args)
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert cp.returncode == 3, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr
    assert len(lines) == 1 and lines[0].startswith("templatetool: format error:"), cp.stderr
    assert str(path) in lines[0]
    assert not out.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # input untouched


def test_library_refuses_tiny_files(tmp_path):
    p = tmp_path / "e.img"
    p.write_bytes(b"")
    with pytest.raises(FormatError, match="empty file is not a disk image"):
        open_disk(p)
    p.write_bytes(bytes(MIN_DISK_BYTES - 1))
    with pytest.raises(FormatError, match="511-byte file"):
        check(p)


def test_one_sector_is_accepted(tmp_path):
    p = tmp_path / "s.img"
    p.write_bytes(bytes(MIN_DISK_BYTES))
    with open_disk(p) as dev:
        assert dev.size == MIN_DISK_BYTES
    cp = run_cli("inspect", str(p))
    assert cp.returncode == 0, cp.stderr
