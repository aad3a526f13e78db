"""The parallel engine (issue 14 item 3): one fork path, never with another thread alive, no
process-wide side effects at import, tuning passed down as an :class:`Engine` object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from templatetool import parallel
from templatetool.bitlocker.reserve import reserve_ntfs
from templatetool.bitlocker.volume import ProtectorKind, ProtectorSpec, decrypt_volume, encrypt_volume, open_fve
from templatetool.blockdev import RawFile
from templatetool.catalog.measure import Measurer, measure_volume
from templatetool.catalog.ntfs import ntfs_free_map
from templatetool.errors import UsageError
from templatetool.parallel import Engine, PassTaps

from .conftest import ROOT
from .test_bitlocker_common import make_ntfs


def _os_threads() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[17])


@pytest.fixture()
def fork_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Hook the engine's only fork: (Python threads alive before, OS threads after) per fork in
    the parent (after: like Python 3.12's check; OpenBLAS stops its threads at fork itself)."""
    log: list[tuple[int, int]] = []
    real = parallel._fork

    def hooked() -> int:
        before = threading.active_count()
        pid = real()
        if pid:
            log.append((before, _os_threads()))
        return pid

    monkeypatch.setattr(parallel, "_fork", hooked)
    return log


def test_encrypt_and_measure_fork_with_no_other_thread(tmp_path: Path, fork_log: list[tuple[int, int]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An encryption observed by two measurers (one hashing in the workers, one on its thread
    pool in this process), a progress bar drawn, then a catalog measure and a decryption: every
    fork happens while this is the only thread (Python 3.12's fork-with-threads warning is an
    error here), and the results are right."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)  # bars drawn
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    vol = make_ntfs(tmp_path / "plain.img", 8)
    regions = reserve_ntfs(vol)
    src = RawFile(vol)
    fm = ntfs_free_map(src)
    in_workers = Measurer(src.size, free_map=fm)
    on_threads = Measurer(src.size, free_map=fm)
    w = in_workers.worker_taps()
    taps = PassTaps(worker_tap=w.worker_tap, on_tap=w.on_tap, tap=on_threads.feed)
    engine = Engine(workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        dst = RawFile.create(tmp_path / "enc.img", src.size)
        res = encrypt_volume(src, dst, protectors=[ProtectorSpec("recovery-password")], regions=regions,
                             taps=taps, engine=engine)
        dst.close()
        root_w, _ = in_workers.finish()
        root_t, _ = on_threads.finish()
        m = measure_volume(src, free_map=fm)
        enc = RawFile(tmp_path / "enc.img")
        pv = open_fve(enc).unlock(recovery_password=res.recovery_password)
        out = RawFile.create(tmp_path / "dec.img", src.size)
        decrypt_volume(pv, out, engine=engine)
        out.close()
    assert root_w == root_t == m.root
    forks = len(fork_log)
    assert forks >= 2 + 2 + 1, fork_log  # encrypt workers, decrypt workers, the key stretch
    assert all(py == 1 for py, _ in fork_log), fork_log
    assert all(os_n == 1 for _, os_n in fork_log), fork_log
    assert (tmp_path / "dec.img").read_bytes() == pv.read(0, src.size)


def test_engine_does_not_fork_beside_a_thread(fork_log: list[tuple[int, int]]) -> None:
    """With another thread alive the engine runs the same work inline (same results, no fork)."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        got = [bytes(out[:n]) for _o, n, out, _p in
               Engine(workers=2).map(lambda off, n, out: out.__setitem__(slice(0, n), bytes([off % 251]) * n) or b"",
                                     [(i * 4096, 4096, True) for i in range(8)], slot=4096) if out is not None]
        job = Engine(workers=2).spawn(lambda: b"x" * 32, 32)
        assert job.result() == b"x" * 32
    finally:
        stop.set()
        t.join()
    assert got == [bytes([(i * 4096) % 251]) * 4096 for i in range(8)]
    assert fork_log == []


def test_import_leaves_the_process_alone() -> None:
    """``import templatetool`` (and the engine, the BitLocker and catalog code) changes no
    environment variable and starts no thread."""
    code = ("import os, threading, json; before = dict(os.environ); import templatetool, templatetool.parallel, "
            "templatetool.bitlocker.volume, templatetool.catalog.measure, templatetool.progress; "
            "print(json.dumps([dict(os.environ) == before, threading.active_count()]))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    cp = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True,
                        check=True)
    assert json.loads(cp.stdout) == [True, 1]


def test_engine_from_env_is_the_only_reader() -> None:
    """Tuning comes from the caller: the library default ignores TEMPLATETOOL_WORKERS; the CLI
    builds its engine with from_env."""
    e = Engine.from_env({"TEMPLATETOOL_WORKERS": "3", "TEMPLATETOOL_DIRECT_IO": "0",
                         "TEMPLATETOOL_INPLACE_CHUNK": "16384"})
    assert (e.workers, e.direct_io, e.step) == (3, False, 16384)
    assert Engine.from_env({}).workers == parallel.default_workers()
    with pytest.raises(UsageError):
        Engine.from_env({"TEMPLATETOOL_INPLACE_CHUNK": "lots"})
    with pytest.raises(UsageError):
        Engine(workers=0)
    old = os.environ.get("TEMPLATETOOL_WORKERS")
    os.environ["TEMPLATETOOL_WORKERS"] = "7"
    try:
        assert parallel.default_engine().workers == parallel.default_workers()
    finally:
        if old is None:
            del os.environ["TEMPLATETOOL_WORKERS"]
        else:
            os.environ["TEMPLATETOOL_WORKERS"] = old


def test_protector_kind_one_spelling() -> None:
    """Protector kinds: one enum; either spelling in, one spelling out."""
    assert ProtectorSpec("startup-key").kind is ProtectorKind.STARTUP_KEY
    assert ProtectorSpec("startup_key").kind is ProtectorKind.STARTUP_KEY
    assert ProtectorKind.RECOVERY_PASSWORD.public == "recovery-password"
    with pytest.raises(UsageError):
        ProtectorSpec("rot13")


def test_metadata_bytes_identical_to_the_pre_engine_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Known answer: with keys, GUIDs and the clock fixed, the boot sector, metadata blocks and
    relocated header of every protector kind, in both layouts, plus a mid-conversion metadata
    block, hash to what the writer of commit 00a6506 (before the typed builders and construct
    ``.build()``) produced for the same inputs."""
    import hashlib
    import itertools
    import uuid

    import templatetool.bitlocker.keys as K
    import templatetool.bitlocker.volume as V

    ctr = itertools.count()
    monkeypatch.setattr(K, "random_key", lambda n: hashlib.sha512(str(next(ctr)).encode()).digest()[:n])
    gc = itertools.count()
    monkeypatch.setattr(V.uuid, "uuid4", lambda: uuid.UUID(int=next(gc) + 12345))
    orig = K.NonceSource.__init__

    def init(self: K.NonceSource, *a: object, **k: object) -> None:
        orig(self, *a, **k)  # type: ignore[arg-type]
        self.time = 132000000000000000

    monkeypatch.setattr(K.NonceSource, "__init__", init)
    p = tmp_path / "v.img"
    p.write_bytes(hashlib.sha256(b"x").digest() * ((8 << 20) // 32))
    src = RawFile(p)
    regions = V.FveRegions((1 << 20, 2 << 20, 3 << 20), 4 << 20)
    specs = [ProtectorSpec("recovery_password", "000011-000022-000033-000044-000055-000066-000077-000088"),
             ProtectorSpec("password", "pw"), ProtectorSpec("startup_key"), ProtectorSpec("clear"),
             ProtectorSpec("tpm", seal=lambda e: (b"blob" + e, 0x880))]
    want = {"standard": "841921c54e748c08d078a3f948db7a4f77c4bbdde146f1916ea675f6b43ac03e",
            "to-go": "9f3f9d12464e19c4852b9337d712731c6791ad351e8776478ca28b4b1b4edf74"}
    for layout, digest in want.items():
        plan = V.plan_encryption(src, protectors=specs, regions=regions, description="d", layout=layout,
                                 engine=Engine(workers=1))
        h = hashlib.sha256()
        for o, b in plan.overlays:
            h.update(o.to_bytes(8, "little") + b)
        h.update(plan.metadata_block(encrypted_size=12345, state=2))
        assert h.hexdigest() == digest, layout
        assert [r.kind for r in plan.result.protectors] == list(ProtectorKind)
    src.close()
