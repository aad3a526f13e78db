"""Mutation fuzzing of the structural areas: check/open/read/write raise only typed errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhdx_corpus import make_base

from templatetool.errors import TemplateToolError
from templatetool.vhdx import check, create_vhdx, open_vhdx
from templatetool.vhdx import structs as S
from templatetool.vhdx.layout import with_crc

MiB = 1 << 20
# (offset, span) of the bytes worth mutating: headers, region tables, metadata table/items, BAT
AREAS = [(64 * 1024, 128), (128 * 1024, 128), (192 * 1024, 128), (256 * 1024, 128), (2 * MiB, 256),
         (2 * MiB + 0x10000, 400), (3 * MiB, 128)]
VALUES = [0, 1, 2, 3, 6, 7, 0xFFFF, 0xFFFFFFFF, MiB, MiB + 6, (5 * MiB) | 7, 1 << 40]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("fuzz-base")
    base = make_base(d / "base.vhdx")
    with create_vhdx(d / "child.vhdx", None, parent=base) as c:
        c.write(1000, b"x" * 5000)
        c.write(3 * MiB, b"y" * 512)
    return {"dynamic": base.read_bytes(), "differencing": (d / "child.vhdx").read_bytes(), "_dir": str(d).encode()}


mutation = st.tuples(st.integers(0, len(AREAS) - 1), st.integers(0, 399), st.booleans(),
                     st.integers(0, 255), st.sampled_from([2, 4, 8]), st.sampled_from(VALUES))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["dynamic", "differencing"]), muts=st.lists(mutation, min_size=1, max_size=4),
       fix_crc=st.booleans())
def test_mutations_give_typed_errors_only(bases, kind: str, muts, fix_crc: bool) -> None:
    b = bytearray(bases[kind])
    for area, pos, single, byte, width, value in muts:
        off, span = AREAS[area]
        p = off + pos % span
        if single:
            b[p] = byte
        else:
            p -= p % width
            b[p:p + width] = value.to_bytes(8, "little")[:width]
    if fix_crc:
        for off in S.HEADER_OFFSETS:
            b[off:off + 4096] = with_crc(bytes(b[off:off + 4096]), 4)
        for off in S.REGION_TABLE_OFFSETS:
            b[off:off + 65536] = with_crc(bytes(b[off:off + 65536]), 4)
    parent_dir = bases["_dir"].decode()
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "f.vhdx"
        f.write_bytes(bytes(b))
        try:
            check(f, parent_search=[parent_dir])
        except TemplateToolError:
            pass
        try:
            with open_vhdx(f, parent_search=[parent_dir]) as d:
                n = min(d.size, 16 * MiB)
                d.read(0, n)
                list(d.allocated_ranges(0, n))
        except TemplateToolError:
            pass
        try:
            with open_vhdx(f, writable=True, parent_search=[parent_dir]) as d:
                d.write(min(d.size, 8 * MiB) // 3, os.urandom(600))
                d.set_user_metadata(S.VIRTUAL_DISK_ID, b"z")
        except TemplateToolError:
            pass
