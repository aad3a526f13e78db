"""Differencing children and user metadata, judged by libvhdi (pyvhdi) and qemu-img."""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import require_module, require_tool
from test_vhdx_interop import pyvhdi_read, qemu_check

from templatetool.errors import IntegrityError, NotFoundError, UsageError
from templatetool.vhdx import check, create_vhdx, cross_check, open_vhdx
from templatetool.vhdx import structs as S
from templatetool.vhdx.layout import crc_with_zeroed

MiB = 1 << 20


def random_writes(d, mirror: bytearray, rnd: random.Random, count: int, max_len: int) -> None:
    for _ in range(count):
        off = rnd.randrange(len(mirror))
        n = min(rnd.randrange(1, max_len), len(mirror) - off)
        data = rnd.randbytes(n) if rnd.random() < 0.85 else bytes(n)
        d.write(off, data)
        mirror[off:off + n] = data


@pytest.mark.parametrize("lss", [512, 4096])
def test_differencing_chain_reads_like_libvhdi(tmp_path: Path, lss: int) -> None:
    require_module("pyvhdi")
    rnd = random.Random(lss)
    size = 10 * MiB
    (tmp_path / "base").mkdir()
    (tmp_path / "kids").mkdir()
    parent = tmp_path / "base" / "parent.vhdx"
    mirror = bytearray(size)
    with create_vhdx(parent, size, block_size=MiB, logical_sector_size=lss) as p:
        random_writes(p, mirror, rnd, 20, 2 * MiB)
    child = tmp_path / "kids" / "child.vhdx"
    with create_vhdx(child, None, parent=parent) as c:
        assert c.subformat == "differencing" and c.size == size and c.logical_sector_size == lss
        # sub-sector, sub-block, cross-block and whole-block writes
        random_writes(c, mirror, rnd, 40, 600 * 1024)
        c.write(3 * MiB, rnd.randbytes(MiB))
        mirror[3 * MiB:4 * MiB] = c.read(3 * MiB, MiB)
        c.write(5 * MiB + 1, b"\0" * 10)  # zeros over parent data must be recorded
        mirror[5 * MiB + 1:5 * MiB + 11] = bytes(10)
        assert c.read(0, size) == bytes(mirror)
    grandchild = tmp_path / "kids" / "grand.vhdx"
    with create_vhdx(grandchild, None, parent=child) as g:
        random_writes(g, mirror, rnd, 15, 100 * 1024)
    with open_vhdx(grandchild) as g:
        assert [p.resolve() for p in g.parent_chain()] == [child.resolve(), parent.resolve()]
        assert g.read(0, size) == bytes(mirror)
        covered = bytearray(size)
        for o, n in g.allocated_ranges():
            covered[o:o + n] = mirror[o:o + n]
        assert bytes(covered) == bytes(mirror)
    assert pyvhdi_read(grandchild, [child, parent]) == bytes(mirror)
    assert check(grandchild) == [] and cross_check(grandchild) == []
    pyvhdi = require_module("pyvhdi")
    f = pyvhdi.file()
    f.open(str(grandchild))
    try:
        assert f.get_disk_type() == 4  # differential
        assert f.get_bytes_per_sector() == lss
        with open_vhdx(child) as c:
            assert uuid.UUID(f.get_parent_identifier()) == c.data_write_guid
    finally:
        f.close()


def test_child_of_qemu_made_parent(tmp_path: Path) -> None:
    require_tool("qemu-img")
    require_module("pyvhdi")
    raw = tmp_path / "p.raw"
    data = bytearray(random.Random(1).randbytes(6 * MiB)) + bytes(2 * MiB)
    raw.write_bytes(data)
    parent = tmp_path / "q.vhdx"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1M",
                    str(raw), str(parent)], check=True)
    child = tmp_path / "c.vhdx"
    with create_vhdx(child, None, parent=parent) as c:
        c.write(1000, b"x" * 5000)
        data[1000:6000] = b"x" * 5000
    assert pyvhdi_read(child, [parent]) == bytes(data)
    with open_vhdx(child) as c:
        assert c.read(0, c.size) == bytes(data)


def test_broken_chains_are_detected(tmp_path: Path) -> None:
    parent = tmp_path / "p.vhdx"
    create_vhdx(parent, 4 * MiB, block_size=MiB).close()
    child = tmp_path / "sub" / "c.vhdx"
    child.parent.mkdir()
    create_vhdx(child, None, parent=parent).close()
    # moved parent: not found, the message names the paths tried; found again via parent_search
    other = tmp_path / "other"
    other.mkdir()
    os.replace(parent, other / "p.vhdx")
    with pytest.raises(NotFoundError) as ei:
        open_vhdx(child)
    assert str(parent) in str(ei.value)
    with open_vhdx(child, parent_search=[other]) as c:
        assert c.parent_chain()[0] == other / "p.vhdx"
    # the parent changes: DataWriteGuid no longer matches
    with open_vhdx(other / "p.vhdx", writable=True) as p:
        p.write(0, b"new")
    with pytest.raises(IntegrityError, match="DataWriteGuid"):
        open_vhdx(child, parent_search=[other])


def read_headers(path: Path) -> list:
    raw = path.read_bytes()
    out = []
    for off in S.HEADER_OFFSETS:
        h = raw[off:off + 4096]
        parsed = S.Header.parse(h)
        assert crc_with_zeroed(h, 4) == parsed.checksum
        out.append(parsed)
    return out


def test_user_metadata_round_trip(tmp_path: Path) -> None:
    require_tool("qemu-img")
    p = tmp_path / "m.vhdx"
    payload = bytes(random.Random(2).randbytes(200_000))
    with create_vhdx(p, 8 * MiB, block_size=MiB) as d:
        d.write(MiB, b"data" * 1000)
    dwg0 = max(read_headers(p), key=lambda h: h.sequence_number).data_write_guid
    gid = uuid.UUID("6b1b7e2e-7f3a-4c55-9a55-0d6a4f6c1a01")
    fid = uuid.uuid4()
    with open_vhdx(p, writable=True) as d:
        d.set_user_metadata(gid, payload)
        d.set_user_metadata(fid, b"file-level", virtual_disk=False)
    hs = read_headers(p)
    assert hs[0].sequence_number != hs[1].sequence_number
    cur = max(hs, key=lambda h: h.sequence_number)
    assert cur.data_write_guid != dwg0 and cur.log_guid.int == 0
    with open_vhdx(p) as d:
        assert sorted(d.user_metadata()) == sorted([(gid, len(payload), True), (fid, 10, False)])
        assert d.get_user_metadata(gid) == payload
        assert d.read(MiB, 4000) == b"data" * 1000
    qemu_check(p)
    assert subprocess.run(["qemu-img", "info", str(p)], check=False, capture_output=True).returncode == 0
    expect = bytearray(8 * MiB)
    expect[MiB:MiB + 4000] = b"data" * 1000
    assert pyvhdi_read(p) == bytes(expect)
    assert check(p) == []
    # replace with a bigger item, add more until the 1 MiB metadata region must grow
    big = [os.urandom(900_000), os.urandom(700_000)]
    with open_vhdx(p, writable=True) as d:
        d.set_user_metadata(gid, big[0])
        d.set_user_metadata(uuid.UUID(int=7), big[1])
    with open_vhdx(p) as d:
        assert d.get_user_metadata(gid) == big[0] and d.get_user_metadata(uuid.UUID(int=7)) == big[1]
        assert d.read(0, d.size) == bytes(expect)
    qemu_check(p)
    assert pyvhdi_read(p) == bytes(expect)
    assert check(p) == []
    # a child copies the IsVirtualDisk items only
    child = tmp_path / "child.vhdx"
    with create_vhdx(child, None, parent=p) as c:
        ids = {g for g, _, _ in c.user_metadata()}
        assert ids == {gid, uuid.UUID(int=7)}
        assert c.get_user_metadata(gid) == big[0]
    # remove, and refuse bad items
    with open_vhdx(p, writable=True) as d:
        d.remove_user_metadata(gid)
        with pytest.raises(NotFoundError):
            d.remove_user_metadata(gid)
        with pytest.raises(UsageError):
            d.set_user_metadata(uuid.uuid4(), b"")
        with pytest.raises(UsageError):
            d.set_user_metadata(uuid.uuid4(), bytes(MiB + 1))
    with open_vhdx(p) as d:
        assert gid not in {g for g, _, _ in d.user_metadata()}
    qemu_check(p)
    assert pyvhdi_read(p) == bytes(expect)
