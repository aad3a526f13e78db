"""The sparse NTFS metadata overlay (disk/overlay.py) and encrypt/protect without a plaintext copy.

Oracle: a full copy of the volume (all-zero chunks left as holes, as the copy ``encrypt`` made
before the overlay) reserved with ntfscp. With ntfscp's clock (libfaketime) and our randomness
pinned, ``encrypt`` of the unreserved volume must give the same bytes as ``encrypt`` of that
reserved copy; the merged view must read exactly the copy's bytes; the overlay must hold only
metadata. Readers (pybde, dislocker) judge the result.
"""

from __future__ import annotations

import multiprocessing.process  # noqa: F401 - draws os.urandom at import: before the pin
import os
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from templatetool.bitlocker import keys as K
from templatetool.bitlocker.reserve import find_reserved, reserve_ntfs
from templatetool.bitlocker.volume import ProtectorSpec, open_fve
from templatetool.blockdev import CHUNK, RawFile, is_zero
from templatetool.catalog.ntfs import ntfs_free_map
from templatetool.disk import overlay as O
from templatetool.pipeline.encrypt import encrypt_disk

from .conftest import IN_CI, require_tool
from .test_bitlocker_common import FILES, dislocker_decrypt, expected_hashes, file_sha256, make_ntfs, ntfs_file_hashes

FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1")
RP = "111111-222222-333333-444444-555555-666666-000011-000022"


def _faketime() -> str:
    for p in FAKETIME_LIBS:
        if Path(p).exists():
            return p
    msg = "needs libfaketime (Debian package faketime) to pin ntfscp's clock"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Pin ntfscp's clock and our randomness/clock; call the result before each run."""
    monkeypatch.setenv("LD_PRELOAD", _faketime())
    monkeypatch.setenv("FAKETIME", "2026-01-01 00:00:00")
    monkeypatch.setattr(time, "time_ns", lambda: 1_780_000_000 * 10**9)
    rng: list[random.Random] = []

    def urandom(n: int) -> bytes:
        return rng[0].randbytes(n)

    monkeypatch.setattr(os, "urandom", urandom)

    def reset() -> None:
        rng[:] = [random.Random(20261203)]
        K.NonceSource._last_time = 0

    return reset


@pytest.fixture
def reserve_probe(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (allocated bytes, metadata bytes of the source) of every file handed to ntfscp."""
    import templatetool.bitlocker.reserve as R
    import templatetool.pipeline.encrypt as E

    seen: list[tuple[int, int]] = []
    real = R.reserve_ntfs

    def probe(path: str | os.PathLike[str]) -> object:
        seen.append((os.stat(path).st_blocks * 512, sum(n for _, n in O.metadata_extents(RawFile(path)))))
        return real(path)

    monkeypatch.setattr(R, "reserve_ntfs", probe)
    monkeypatch.setattr(E, "reserve_ntfs", probe)
    return seen


def _assert_metadata_only(seen: list[tuple[int, int]]) -> None:
    """ntfscp was handed a file holding the volume's metadata only (no staged file data)."""
    assert seen, "no reservation was made"
    for allocated, meta in seen:
        assert allocated <= meta + 64 * 1024, (allocated, meta)


def _vol_with_free_space_content(tmp: Path, size_mib: int = 24, cluster: int = 4096) -> Path:
    """mkntfs + files, then free space made interesting: one free 1 MiB chunk of random bytes,
    one written as explicit zeros (allocated in the file, all zero), random bytes in a few free
    clusters of a partly used chunk; the rest of free space stays holes."""
    if cluster == 4096:
        vol = make_ntfs(tmp / "vol.img", size_mib)
    else:  # the same files on a volume with clusters smaller than the overlay file's blocks
        vol = tmp / "vol.img"
        with open(vol, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["mkntfs", "-q", "-F", "-f", "-c", str(cluster), str(vol)], check=True, capture_output=True)
        files = {**FILES, "tail.bin": random.Random(9).randbytes(3 * cluster)}  # ends inside a 4 KiB block
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            subprocess.run(["ntfscp", "-q", str(vol), str(tmp / name), name], check=True, capture_output=True)
    fm = ntfs_free_map(RawFile(vol))
    cs = fm.cluster_size
    any_used = fm.any_used_per(CHUNK // cs, fm.cluster_count * cs // CHUNK)
    assert any_used is not None
    free = [i for i, u in enumerate(any_used.tolist()) if not u]
    assert len(free) >= 4
    rnd = random.Random(5)
    with open(vol, "r+b") as f:
        f.seek(free[1] * CHUNK)
        f.write(rnd.randbytes(CHUNK))
        f.seek(free[2] * CHUNK)
        f.write(bytes(CHUNK))
        used = fm.used
        partly = next(c for c in range(len(any_used)) if any_used[c]
                      and not used[c * CHUNK // cs:(c + 1) * CHUNK // cs].all())
        for k in range(partly * CHUNK // cs, (partly + 1) * CHUNK // cs):
            if not used[k] and k % 3 == 0:
                f.seek(k * cs)
                f.write(rnd.randbytes(cs))
    return vol


def _oracle_copy(vol: Path, out: Path) -> Path:
    """The copy ``encrypt`` staged before the overlay: zero chunks as holes, then ntfscp."""
    src = RawFile(vol)
    with open(out, "wb") as f:
        f.truncate(src.size)
        for off in range(0, src.size, CHUNK):
            data = src.read(off, min(CHUNK, src.size - off))
            if not is_zero(data):
                f.seek(off)
                f.write(data)
    src.close()
    reserve_ntfs(out)
    return out


def test_structs_match_construct_layout() -> None:
    """The scan's struct formats are the construct declarations' layout."""
    rec = bytes(range(48))
    c = O.FILE_RECORD_HEADER.parse(rec)
    s = O._REC.unpack_from(rec, 0)
    assert O._REC.size == O.FILE_RECORD_HEADER.sizeof()
    assert (c.magic, c.usa_offset, c.usa_count, c.attrs_offset, c.flags, c.bytes_in_use, c.base_reference) == \
        (s[0], s[1], s[2], s[6], s[7], s[8], s[10])
    a = O.ATTRIBUTE_HEADER.parse(rec)
    assert (a.type, a.length, a.non_resident) == O._ATTR.unpack_from(rec, 0)[:3]
    assert O.ATTRIBUTE_HEADER.sizeof() + O.NONRESIDENT_HEADER.sizeof() == 34  # mapping pairs offset at 32
    assert O.NONRESIDENT_HEADER.parse(rec[16:]).mapping_pairs_offset == struct.unpack_from("<H", rec, 32)[0]


def test_mapping_pairs_decode() -> None:
    # 0x21: 1-byte count, 2-byte offset; then a sparse run (0x01); then a negative delta
    mp = bytes([0x21, 0x10, 0x00, 0x01, 0x01, 0x05, 0x21, 0x04, 0xF0, 0xFF, 0x00])
    assert O._mapping_pairs(mp, 0, len(mp)) == [(256, 16), (256 - 16, 4)]


@pytest.mark.parametrize("cluster", [4096, 512])
def test_merged_view_reads_the_reserved_copy(tmp_path: Path, pinned: Callable[[], None], cluster: int) -> None:
    require_tool("mkntfs", "ntfscp")
    vol = _vol_with_free_space_content(tmp_path, cluster=cluster)
    before = file_sha256(vol)
    pinned()
    ref = _oracle_copy(vol, tmp_path / "ref.img")
    src = RawFile(vol)
    with O.MetadataOverlay(src, tmp_path) as ov:
        meta = sum(n for _, n in O.metadata_extents(src))
        # only metadata is copied: a tenth of this 24 MiB volume, whose files take ~0.3 MiB
        # and whose free space holds 1 MiB of random bytes (with 512-byte clusters, the blocks
        # holding free clusters too: that random MiB among them)
        small = src.size // 8 if cluster == 4096 else src.size // 3
        if cluster == 4096:
            assert ov.copied <= meta and ov.allocated_bytes() <= meta + 64 * 1024
        assert ov.allocated_bytes() < small
        assert reserve_ntfs(ov.path) == find_reserved(RawFile(ref))
        assert ov.allocated_bytes() < small
        if cluster < 4096:
            # a write into one free cluster of a block shared with file data (what ntfscp may do
            # with small clusters) must leave the neighbours' bytes readable through the view
            fm = ntfs_free_map(src)
            used = fm.used
            per = 4096 // cluster
            meta_spans = O.metadata_extents(src)

            def file_data_block(c: int) -> bool:
                b = c // per * 4096
                return (not used[c] and bool(used[c // per * per:c // per * per + per].any())
                        and not is_zero(src.read(b, 4096)) and not any(o < b + 4096 and b < o + n for o, n in meta_spans))

            k = next(c for c in range(len(used)) if file_data_block(c))
            for path in (ov.path, ref):
                with open(path, "r+b") as f:
                    f.seek(k * cluster)
                    f.write(b"\xa5" * cluster)
        m = ov.merged(free_map=ntfs_free_map(src))
        r = RawFile(ref)
        for off in range(0, src.size, CHUNK):
            assert m.read(off, CHUNK) == r.read(off, CHUNK), off
        # unaligned reads across overlay/source boundaries
        rnd = random.Random(1)
        for _ in range(200):
            o = rnd.randrange(src.size - 70000)
            n = rnd.randrange(1, 70000)
            assert m.read(o, n) == r.read(o, n)
        # the sparse decision sees what the copy's holes say
        def chunks(dev: object) -> set[int]:
            return {c for o, n in dev.allocated_ranges() for c in range(o // CHUNK, -(-(o + n) // CHUNK))}  # type: ignore[attr-defined]
        assert chunks(m) == chunks(r)
        m.close()
        path = ov.path
    assert not path.exists()
    assert file_sha256(vol) == before


@pytest.mark.parametrize("cluster", [4096, 512])
def test_encrypt_same_bytes_as_reserved_copy(tmp_path: Path, pinned: Callable[[], None],
                                             reserve_probe: list[tuple[int, int]], cluster: int) -> None:
    require_tool("mkntfs", "ntfscp", "dislocker-file")
    vol = _vol_with_free_space_content(tmp_path, cluster=cluster)
    spec = [ProtectorSpec("recovery_password", RP)]
    pinned()
    ref = _oracle_copy(vol, tmp_path / "ref.img")
    pinned()
    a = encrypt_disk(ref, tmp_path / "ref-enc.img", protectors=spec, workers=2)
    assert a["reused_reservation"]
    pinned()
    reserve_probe.clear()
    b = encrypt_disk(vol, tmp_path / "enc.img", protectors=[ProtectorSpec("recovery_password", RP)], workers=2)
    if cluster == 4096:  # (smaller clusters: the blocks holding free clusters are copied too)
        _assert_metadata_only(reserve_probe)
    assert not b["reused_reservation"] and b["skipped_bytes"] == a["skipped_bytes"] > 0
    assert file_sha256(tmp_path / "enc.img") == file_sha256(tmp_path / "ref-enc.img")
    assert not list(tmp_path.glob(".tt-overlay-*"))
    dec = dislocker_decrypt(tmp_path / "enc.img", tmp_path / "dl.img", recovery_password=RP)
    assert ntfs_file_hashes(dec, FILES) == expected_hashes()
    assert open_fve(RawFile(tmp_path / "enc.img")).info()["method"] == "xts-aes-128"


def test_overlay_stays_metadata_sized_for_a_full_volume(tmp_path: Path) -> None:
    """A volume whose files fill most of it: the overlay holds the metadata only."""
    require_tool("mkntfs", "ntfscp")
    vol = tmp_path / "full.img"
    with open(vol, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-c", "4096", str(vol)], check=True, capture_output=True)
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(3).randbytes(40 << 20))
    subprocess.run(["ntfscp", "-q", str(vol), str(big), "big.bin"], check=True, capture_output=True)
    src = RawFile(vol)
    with O.MetadataOverlay(src, tmp_path) as ov:
        reserve_ntfs(ov.path)
        assert ov.allocated_bytes() < 8 << 20  # vs 40 MiB of file data
        m = ov.merged()
        assert m.read(0, src.size) != src.read(0, src.size)  # the reservation is visible
        fs_hash = shutil.which("ntfscat")
        m.close()
    assert fs_hash is not None


def test_overlay_refuses_a_non_ntfs_volume(tmp_path: Path) -> None:
    raw = tmp_path / "zero.img"
    raw.write_bytes(bytes(1 << 20))
    from templatetool.errors import UnsupportedError

    with pytest.raises(UnsupportedError):
        O.MetadataOverlay(RawFile(raw), tmp_path)
    assert not list(tmp_path.glob(".tt-overlay-*"))


def test_protect_same_template_as_reserved_copy(tmp_path: Path, pinned: Callable[[], None],
                                                reserve_probe: list[tuple[int, int]]) -> None:
    """protect of the unreserved golden disk == protect of a copy reserved beforehand (disk bytes
    and catalog root), with no staged copy of the volume; the source is not modified."""
    require_tool("qemu-img", "ntfscp")
    from templatetool.disk import find_os_volume, open_disk, read_partition_table
    from templatetool.pipeline.protect import protect
    from templatetool.signers.base import KeySigner
    from templatetool.signers.certs import new_key, self_signed

    from .conftest import GOLDEN

    disk = tmp_path / "golden.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(GOLDEN), str(disk)], check=True)
    d = open_disk(disk)
    part = find_os_volume(read_partition_table(d), d)
    off, size = part.offset, part.size
    d.close()
    before = file_sha256(disk)
    pinned()
    vol = tmp_path / "vol.img"
    with open(disk, "rb") as fi, open(vol, "wb") as fo:
        fi.seek(off)
        fo.write(fi.read(size))
    reserve_ntfs(vol)
    reserve_probe.clear()
    ref_disk = tmp_path / "ref.raw"
    shutil.copyfile(disk, ref_disk)
    with open(ref_disk, "r+b") as f:
        f.seek(off)
        f.write(vol.read_bytes())
    k = new_key("ec-p256")
    signer = KeySigner(k, self_signed("CN=Overlay Test", k))
    a = protect(ref_disk, tmp_path / "ref-t.img", "T", "1.0.0.0", signer)
    b = protect(disk, tmp_path / "t.img", "T", "1.0.0.0", signer)
    _assert_metadata_only(reserve_probe)
    assert a.document.root == b.document.root
    assert a.reserved == b.reserved
    assert file_sha256(tmp_path / "t.img") == file_sha256(tmp_path / "ref-t.img")
    assert b.bytes_read < size + off  # the volume was not staged (it was read once, used blocks only)
    assert file_sha256(disk) == before
    assert not list(tmp_path.glob(".tt-*"))


def test_overlay_write_failure_is_a_resource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing the overlay: exit-8 ResourceError, no file left (was OSError: exit 70)."""
    import errno

    from templatetool.errors import ResourceError

    vol = make_ntfs(tmp_path / "vol.img", 16)

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ResourceError, match="No space left"):
        O.MetadataOverlay(RawFile(vol), tmp_path)
    assert not list(tmp_path.glob(".tt-overlay-*"))
