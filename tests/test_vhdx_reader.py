"""Reader behaviour: I/O efficiency, tolerated deviations, read-only protection."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from test_vhdx_interop import make_raw, pyvhdi_read, qemu_check

from templatetool.errors import UnsupportedError
from templatetool.vhdx import check, convert, create_vhdx, open_vhdx
from templatetool.vhdx import structs as S

MiB = 1 << 20


def test_one_preadv_per_contiguous_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(os.urandom(8 * MiB))
    v = tmp_path / "v.vhdx"
    convert(raw, v, block_size=MiB, progress=False)  # blocks 0..7 allocated back to back
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, bufs: list, off: int) -> int:
        calls.append(off)
        return real(fd, bufs, off)

    with open_vhdx(v) as d:
        monkeypatch.setattr(os, "preadv", counting)
        data = d.read(100, 8 * MiB - 200)  # spans all 8 blocks
        monkeypatch.setattr(os, "preadv", real)
    assert data == raw.read_bytes()[100:8 * MiB - 100]
    assert len(calls) == 1, calls


def test_one_bad_header_is_tolerated_but_reported(tmp_path: Path) -> None:
    require_tool("qemu-img")
    raw = tmp_path / "r.raw"
    expected = make_raw(raw, 12 * MiB, seed=9)
    v = tmp_path / "v.vhdx"
    convert(raw, v, block_size=MiB, progress=False)
    with open(v, "r+b") as f:  # break header 1's CRC (a torn header update)
        f.seek(S.HEADER_OFFSETS[0] + 100)
        f.write(b"\xff")
    with open_vhdx(v) as d:
        assert d.read(0, d.size) == expected
    problems = [str(f) for f in check(v) if f.severity == "error"]
    assert any("header 1: CRC-32C mismatch" in p for p in problems), problems
    qemu_check(v)  # qemu agrees the file is usable
    # writing repairs it: both headers are rewritten with new sequence numbers
    with open_vhdx(v, writable=True) as d:
        d.write(0, b"fix")
    assert check(v) == []
    assert pyvhdi_read(v)[:3] == b"fix"


def test_read_only_and_bounds(tmp_path: Path) -> None:
    v = tmp_path / "v.vhdx"
    create_vhdx(v, 4 * MiB, block_size=MiB).close()
    with open_vhdx(v) as d:
        with pytest.raises(UnsupportedError):
            d.write(0, b"x")
        with pytest.raises(Exception, match="outside the device"):
            d.read(4 * MiB - 1, 2)
        assert d.read(4 * MiB - 1, 1) == b"\0"
    before = v.read_bytes()
    with open_vhdx(v, writable=True) as d:
        d.write(0, bytes(MiB))  # zeros into an unallocated block: nothing is allocated
        assert d.allocated_bytes() == 0
    assert os.path.getsize(v) == len(before)


def test_qemu_zero_state_fixed_image(tmp_path: Path) -> None:
    """qemu's default 'fixed' images mark blocks ZERO; writes then allocate at the end of the file."""
    require_tool("qemu-img")
    v = tmp_path / "q.vhdx"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", "subformat=fixed,block_size=1M", str(v), "6M"],
                   check=True)
    with open_vhdx(v, writable=True) as d:
        assert d.read(0, d.size) == bytes(6 * MiB)
        d.write(2 * MiB + 5, b"hello")
    qemu_check(v)
    expect = bytearray(6 * MiB)
    expect[2 * MiB + 5:2 * MiB + 10] = b"hello"
    assert pyvhdi_read(v) == bytes(expect)
