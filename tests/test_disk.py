"""Partition tables, volume views, filesystem sniffing and `inspect`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from templatetool.blockdev import RawFile, View
from templatetool.disk import find_os_volume, open_disk, read_partition_table, select_volume, sniff_filesystem
from templatetool.errors import FormatError, IntegrityError, NotFoundError

from .conftest import FIXTURES, assert_clean_error, require_tool, run_cli

MANIFEST = json.loads((FIXTURES / "golden.json").read_text())


@pytest.fixture
def golden_raw(tmp_path: Path, golden: Path) -> Path:
    """The golden disk as a raw image, converted by qemu-img (an independent reader)."""
    require_tool("qemu-img")
    out = tmp_path / "golden.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(golden), str(out)], check=True)
    return out


def test_gpt_layout_matches_manifest(golden_raw: Path) -> None:
    with open_disk(golden_raw) as dev:
        table = read_partition_table(dev)
        assert table.scheme == "gpt" and not table.warnings
        got = [(p.index, p.kind, p.offset, p.size) for p in table.partitions]
        want = [(p["index"], p["kind"], p["offset"], p["size"]) for p in MANIFEST["partitions"]]
        assert got == want
        fss = [sniff_filesystem(p.view(dev)) for p in table.partitions]
        assert fss == [p["filesystem"] for p in MANIFEST["partitions"]]
        assert find_os_volume(table, dev).index == 3


def test_sgdisk_agrees(golden_raw: Path) -> None:
    require_tool("sgdisk")
    out = subprocess.run(["sgdisk", "-p", str(golden_raw)], capture_output=True, text=True, check=True).stdout
    with open_disk(golden_raw) as dev:
        for p in read_partition_table(dev).partitions:
            first = p.offset // 512
            last = (p.offset + p.size) // 512 - 1
            assert any(line.split()[:3] == [str(p.index), str(first), str(last)] for line in out.splitlines()
                       if line.strip() and line.split()[0].isdigit()), (p, out)


def _corrupt(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_primary_gpt_bad_uses_backup(golden_raw: Path) -> None:
    _corrupt(golden_raw, 512 + 40)  # inside the primary header
    with open_disk(golden_raw) as dev:
        table = read_partition_table(dev)
        assert len(table.partitions) == 3
        assert any("backup" in w for w in table.warnings)


def test_both_gpt_headers_bad(golden_raw: Path) -> None:
    size = golden_raw.stat().st_size
    _corrupt(golden_raw, 512 + 40)
    _corrupt(golden_raw, size - 512 + 40)
    with open_disk(golden_raw) as dev, pytest.raises(IntegrityError):
        read_partition_table(dev)
    cp = run_cli("inspect", str(golden_raw))
    assert_clean_error(cp, 4)


def test_gpt_entries_crc(golden_raw: Path) -> None:
    _corrupt(golden_raw, 1024 + 56)  # first entry's name, primary array
    with open_disk(golden_raw) as dev:
        t = read_partition_table(dev)
        assert any("primary" in w for w in t.warnings)


def test_mbr_disk(tmp_path: Path) -> None:
    img = tmp_path / "mbr.raw"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    mbr = bytearray(512)
    mbr[0] = 0xFA  # boot code, not a jump
    entry = bytes([0x80, 0, 0, 0, 0x07, 0, 0, 0]) + (2048).to_bytes(4, "little") + (8192).to_bytes(4, "little")
    mbr[446:462] = entry
    mbr[510:512] = b"\x55\xaa"
    with open(img, "r+b") as f:
        f.write(mbr)
    with open_disk(img) as dev:
        t = read_partition_table(dev)
        assert t.scheme == "mbr"
        assert [(p.index, p.offset, p.size, p.kind) for p in t.partitions] == [(1, 2048 * 512, 8192 * 512, "basic-data")]
        with pytest.raises(NotFoundError):
            t.get(2)


def test_mbr_partition_past_end(tmp_path: Path) -> None:
    img = tmp_path / "bad.raw"
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 0, 0, 0x07, 0, 0, 0]) + (2048).to_bytes(4, "little") + (1 << 30).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    img.write_bytes(bytes(mbr) + bytes(1 << 20))
    with open_disk(img) as dev, pytest.raises(FormatError):
        read_partition_table(dev)
    assert_clean_error(run_cli("inspect", str(img)), 3)


def test_bare_ntfs_volume(tmp_path: Path) -> None:
    require_tool("mkntfs")
    img = tmp_path / "vol.ntfs"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkntfs", "-F", "-Q", "-q", str(img)], check=True, capture_output=True)
    with open_disk(img) as dev:
        t = read_partition_table(dev)
        assert t.scheme is None
        view, part = select_volume(dev)
        assert part is None and view.size == dev.size
        assert sniff_filesystem(view) == "ntfs"


def test_view_window_and_bounds(tmp_path: Path) -> None:
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(range(256)) * 64)
    with RawFile(img) as dev:
        v = View(dev, 256, 1024)
        assert v.read(0, 4) == bytes([0, 1, 2, 3])
        assert v.read(1020, 4) == bytes([252, 253, 254, 255])
        with pytest.raises(FormatError):
            v.read(1020, 8)
        with pytest.raises(FormatError):
            View(dev, 16000, 1000)


def test_raw_allocated_ranges_follow_holes(tmp_path: Path) -> None:
    img = tmp_path / "sparse.raw"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"x" * 4096)
    with RawFile(img) as dev:
        ranges = list(dev.allocated_ranges())
        assert sum(n for _, n in ranges) < (1 << 20)
        assert any(o <= (10 << 20) < o + n for o, n in ranges)


def test_inspect_cli_json(golden_raw: Path) -> None:
    cp = run_cli("inspect", str(golden_raw), "--json")
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)["result"]
    assert r["container"]["format"] == "raw"
    assert [v["filesystem"] for v in r["volumes"]] == ["fat32", None, "ntfs"]


def test_inspect_golden_vhdx(golden: Path) -> None:
    cp = run_cli("inspect", str(golden), "--json")
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)["result"]
    assert r["container"]["format"] == "vhdx"
    assert r["container"]["subformat"] == "dynamic"
    assert r["container"]["virtual_size"] == MANIFEST["disk"]["virtual_size"]
    assert [v["filesystem"] for v in r["volumes"]] == ["fat32", None, "ntfs"]


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"vhdxfile" + bytes(100)])
def test_inspect_bad_inputs(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.img"
    p.write_bytes(content)
    cp = run_cli("inspect", str(p))
    # an empty, sub-sector or truncated file is malformed input, raw or VHDX
    assert_clean_error(cp, 3)


def test_inspect_folder_is_usage_error(tmp_path: Path) -> None:
    assert_clean_error(run_cli("inspect", str(tmp_path)))
