"""The process-parallel disk pass: ordered results, errors, and byte-equality with the reference.

The fast path (forked workers reading, hashing, XTS-encrypting into shared memory and writing
straight into the output file) must give exactly the bytes the reference gives: per-sector
``cryptography`` XTS for the ciphertext, hashlib over the plaintext for the catalog leaves.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from templatetool.bitlocker.cipher import XtsCipher
from templatetool.bitlocker.reserve import reserve_ntfs
from templatetool.bitlocker.volume import (
    ProtectorSpec,
    decrypt_volume,
    encrypt_volume,
    open_fve,
)
from templatetool.blockdev import CHUNK, RawFile, View
from templatetool.catalog.measure import Measurer
from templatetool.catalog.ntfs import ntfs_free_map
from templatetool.disk import create_disk
from templatetool.errors import FormatError, ResourceError
from templatetool.parallel import Engine, PassTaps, chunk_items, ordered_map
from templatetool.pipeline.encrypt import sparse_skipper

from .test_bitlocker_common import make_ntfs


def _no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _fill(off: int, n: int, out: memoryview) -> bytes:
    out[:n] = (off.to_bytes(8, "little") * (n // 8 + 1))[:n]
    return f"{off}:{n}".encode()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_keeps_order_and_passes_skips_through(workers: int) -> None:
    items = []
    for i in range(40):
        items.append((i * 4096, 4096 - (i % 5) * 512, i % 7 != 3))
    got = []
    for off, n, out, payload in ordered_map(_fill, items, workers, slot=4096, depth=2):
        if out is None:
            got.append((off, n, None))
        else:
            assert bytes(out[:n]) == (off.to_bytes(8, "little") * 512)[:n]
            got.append((off, n, payload))
    assert got == [(o, n, f"{o}:{n}".encode() if w else None) for o, n, w in items]
    assert _no_children_left()


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_errors_come_back_typed(workers: int) -> None:
    def fn(off: int, n: int, out: memoryview) -> bytes:
        if off == 5 * 4096:
            raise FormatError("bad sector", f"offset {off}")
        return b""

    with pytest.raises(FormatError, match="bad sector"):
        for _ in ordered_map(fn, [(i * 4096, 4096, True) for i in range(20)], workers, slot=4096):
            pass
    assert _no_children_left()


def test_dead_worker_is_a_resource_error() -> None:
    def fn(off: int, n: int, out: memoryview) -> bytes:
        if off == 3 * 4096:
            os.kill(os.getpid(), signal.SIGKILL)
        return b""

    with pytest.raises(ResourceError, match="worker process died"):
        for _ in ordered_map(fn, [(i * 4096, 4096, True) for i in range(20)], 2, slot=4096):
            pass
    assert _no_children_left()


def test_chunk_items_runs_equal_per_chunk_skip() -> None:
    rng = random.Random(7)
    flags = [rng.random() < 0.6 for _ in range(300)]
    size = 300 * CHUNK - 1000  # a short last chunk

    def skip(off: int, n: int) -> bool:
        return flags[off // CHUNK]

    def mask(chunk: int):
        import numpy as np

        return np.array(flags, dtype=bool)

    keep = {0, 17, 299}
    per_chunk = list(chunk_items(size, CHUNK, skip, keep))
    skip.chunk_mask = mask  # type: ignore[attr-defined]
    runs = list(chunk_items(size, CHUNK, skip, keep))
    assert len(runs) < len(per_chunk)
    assert all(n <= CHUNK for _, n, w in runs if w)  # work items stay single chunks

    def expand(items):
        out = []
        for off, n, w in items:
            out += [(o, w) for o in range(off, off + n, CHUNK)]
        return out

    expected = [(i * CHUNK, not flags[i] or i in keep) for i in range(300)]
    assert expand(runs) == expand(per_chunk) == expected
    assert sum(n for _, n, _ in runs) == size


def _reference_xts(key: bytes, ss: int, data: bytes, first_sector: int) -> bytes:
    out = []
    for i in range(len(data) // ss):
        tweak = (first_sector + i).to_bytes(16, "little")
        enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        out.append(enc.update(data[i * ss:(i + 1) * ss]) + enc.finalize())
    return b"".join(out)


@pytest.mark.parametrize("method,ss", [("xts-aes-128", 512), ("xts-aes-256", 4096)])
@pytest.mark.parametrize("layout", ["dense-raw", "sparse-vhdx"])
def test_parallel_encrypt_equals_reference(tmp_path: Path, method: str, ss: int, layout: str) -> None:
    vol = make_ntfs(tmp_path / "plain.img", 24, sector_size=ss)
    regions = reserve_ntfs(vol)
    src = RawFile(vol, sector_size=ss)
    plain = vol.read_bytes()
    if layout == "dense-raw":
        dst: RawFile | View = RawFile.create(tmp_path / "enc.img", src.size, sector_size=ss)
        disk = None
        skip = None
    else:
        disk = create_disk(tmp_path / "enc.vhdx", src.size, like=src, fmt="vhdx", block_size=1 << 20)
        dst = View(disk, 0, src.size)
        skip = sparse_skipper(src)
    fm = ntfs_free_map(src)
    m = Measurer(src.size, free_map=fm)
    skipped: list[int] = []

    def on_skip(off: int, n: int) -> None:
        skipped.append(n)
        m.feed_zeros(off, n)

    taps = PassTaps(skip=skip, on_skip=on_skip, worker_tap=m.block_digests, on_tap=m.accept_digests)
    res = encrypt_volume(src, dst, method=method, protectors=[ProtectorSpec("recovery_password")], regions=regions,
                         taps=taps, engine=Engine(workers=2))
    root, _ = m.finish()
    ref = Measurer(src.size, free_map=fm)
    ref.feed(0, plain)
    assert root == ref.finish()[0]  # worker-side hashing == in-process reference
    if disk is not None:
        disk.close()
        assert skipped and sum(skipped) > 0  # the sparse path ran
        from templatetool.disk import open_disk

        enc_dev = open_disk(tmp_path / "enc.vhdx")
    else:
        dst.close()
        enc_dev = RawFile(tmp_path / "enc.img", sector_size=ss)
    try:
        fve = open_fve(enc_dev)
        fvek = fve.fvek(fve.recover_vmk(recovery_password=res.recovery_password))
        key = fvek[:32] if method == "xts-aes-128" else fvek[:64]
        assert len(key) == (32 if method == "xts-aes-128" else 64)
        overlays = [(0, regions.vho_size)] + [(o, 65536) for o in regions.metadata_offsets] + \
            [(regions.vho_offset, regions.vho_size)]
        rng = random.Random(ss)
        checked = 0
        for _ in range(40):
            nsec = rng.randint(1, 64)
            first = rng.randrange(0, src.size // ss - nsec)
            a, b = first * ss, (first + nsec) * ss
            if any(o < b and a < o + n for o, n in overlays):
                continue
            if skip is not None and skip(a // CHUNK * CHUNK, CHUNK):
                continue
            assert enc_dev.read(a, b - a) == _reference_xts(key, ss, plain[a:b], first)
            checked += 1
        assert checked >= 10
        # and our own batched cipher agrees with the reference on a whole chunk
        c = XtsCipher(key, ss)
        assert c.encrypt(plain[CHUNK:2 * CHUNK], CHUNK // ss) == _reference_xts(key, ss, plain[CHUNK:2 * CHUNK], CHUNK // ss)
        # the plaintext view gives the source back wherever the source was not skipped
        pv = fve.unlock(recovery_password=res.recovery_password)
        # decrypt fast path (read + decrypt in place in the slot) == the reference read, chunk by chunk
        slot = memoryview(bytearray(CHUNK + 64))
        for off in range(0, src.size, CHUNK):
            n = min(CHUNK, src.size - off)
            pv.read_chunk_into(off, n, slot)
            assert bytes(slot[:n]) == pv.read(off, n), off
        # and the parallel decrypt writes exactly that
        out = RawFile.create(tmp_path / "dec.img", src.size, sector_size=ss)
        try:
            decrypt_volume(pv, out, engine=Engine(workers=2))
        finally:
            out.close()
        dec = (tmp_path / "dec.img").read_bytes()
        assert dec == pv.read(0, src.size)
        for off in range(0, src.size, CHUNK):
            n = min(CHUNK, src.size - off)
            if skip is not None and skip(off, n):
                continue
            if any(o < off + n and off < o + k for o, k in overlays[1:-1]):
                continue
            assert pv.read(off, n) == plain[off:off + n], off
    finally:
        enc_dev.close()
        src.close()


def test_vhdx_direct_io_payload_writes_read_back(tmp_path: Path) -> None:
    """Aligned 1 MiB writes from page-aligned buffers go through O_DIRECT (where the filesystem
    allows it) and read back exactly; unaligned ones take the buffered path."""
    import mmap

    from templatetool.vhdx import create_vhdx, open_vhdx

    size = 64 << 20
    d = create_vhdx(tmp_path / "d.vhdx", size, subformat="dynamic")
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, like the workers' shared slots
    rnd = random.Random(3)
    expect = {}
    try:
        for off in (0, 5 * CHUNK, 33 * CHUNK, size - CHUNK):
            data = rnd.randbytes(CHUNK)
            buf[:] = data
            d.write(off, memoryview(buf))
            expect[off] = data
        direct = d._direct.active
        odd = rnd.randbytes(4096 * 3 + 512)
        d.write(7 * CHUNK + 512, odd)  # unaligned: buffered
        expect_odd = odd
    finally:
        d.close()
    try:  # does this filesystem take O_DIRECT at all (tmpfs does not)?
        os.close(os.open(tmp_path / "d.vhdx", os.O_WRONLY | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False
    assert direct == supported
    r = open_vhdx(tmp_path / "d.vhdx")
    try:
        for off, data in expect.items():
            assert r.read(off, CHUNK) == data
        assert r.read(7 * CHUNK + 512, len(expect_odd)) == expect_odd
    finally:
        r.close()
    import shutil
    import subprocess

    if shutil.which("qemu-img"):
        cp = subprocess.run(["qemu-img", "check", str(tmp_path / "d.vhdx")], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stdout + cp.stderr
