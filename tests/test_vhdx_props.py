"""Property tests: random writes/reads on dynamic and differencing VHDX against a bytearray mirror."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from templatetool.vhdx import check, create_vhdx, open_vhdx

MiB = 1 << 20
SIZE = 3 * MiB + 512 * 5  # a partial last block

ops = st.lists(
    st.tuples(
        st.integers(0, SIZE - 1),  # offset
        st.integers(1, 300_000),  # length
        st.sampled_from(["random", "zero", "byte"]),
        st.integers(0, 255),
    ),
    min_size=1, max_size=12,
)
reads = st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 2 * MiB)), max_size=6)


def _payload(kind: str, n: int, seed: int) -> bytes:
    if kind == "zero":
        return bytes(n)
    if kind == "byte":
        return bytes([seed]) * n
    import random

    return random.Random(seed * 7919 + n).randbytes(n)


def _apply(d, mirror: bytearray, operations) -> None:
    for off, n, kind, seed in operations:
        n = min(n, SIZE - off)
        data = _payload(kind, n, seed)
        d.write(off, data)
        mirror[off:off + n] = data


def _verify(path: Path, mirror: bytearray, read_ops) -> None:
    with open_vhdx(path) as d:
        for off, n in read_ops:
            n = min(n, SIZE - off)
            assert d.read(off, n) == bytes(mirror[off:off + n])
        assert d.read(0, SIZE) == bytes(mirror)
        covered = bytearray(SIZE)
        for o, n in d.allocated_ranges():
            covered[o:o + n] = mirror[o:o + n]
        assert covered == mirror
    assert [f for f in check(path) if f.severity == "error"] == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=ops, read_ops=reads)
def test_dynamic_matches_mirror(operations, read_ops) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "d.vhdx"
        mirror = bytearray(SIZE)
        with create_vhdx(p, SIZE, block_size=MiB) as d:
            _apply(d, mirror, operations)
            assert d.read(0, SIZE) == bytes(mirror)
        _verify(p, mirror, read_ops)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_ops=ops, child_ops=ops, read_ops=reads, lss=st.sampled_from([512, 4096]))
def test_differencing_matches_mirror(base_ops, child_ops, read_ops, lss) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        size_ok = SIZE - SIZE % lss
        parent = Path(tmp) / "p.vhdx"
        mirror = bytearray(SIZE)
        with create_vhdx(parent, size_ok, block_size=MiB, logical_sector_size=lss) as d:
            _apply(d, mirror, [(o, n, k, s) for o, n, k, s in base_ops if o < size_ok])
        child = Path(tmp) / "c.vhdx"
        mirror = mirror[:size_ok]
        with create_vhdx(child, None, parent=parent) as c:
            for off, n, kind, seed in child_ops:
                if off >= size_ok:
                    continue
                n = min(n, size_ok - off)
                data = _payload(kind, n, seed)
                c.write(off, data)
                mirror[off:off + n] = data
        with open_vhdx(child) as c:
            assert c.read(0, size_ok) == bytes(mirror)
            for off, n in read_ops:
                off = min(off, size_ok - 1)
                n = min(n, size_ok - off)
                assert c.read(off, n) == bytes(mirror[off:off + n])
        assert [f for f in check(child) if f.severity == "error"] == []
