"""`encrypt --in-place --used-space-only`: spans free in NTFS *and* unallocated in the disk are
left as they are (no journal record, no write), so the time and a dynamic VHDX's size follow the
used data. Judged by the readers: pybde returns every used cluster of the original, our decrypt
returns the original byte for byte (its free-space skip sees the same holes), the sparse file
stays sparse, a VHDX stays small (qemu-img check clean), and a SIGKILL + resume still ends right.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from templatetool.blockdev import RawFile

from .conftest import assert_clean_error, require_module, require_tool, run_cli
from .test_inplace import _vhdx_partition, make_reserved, protected_vhdx, run_and_kill  # noqa: F401

MiB = 1 << 20


@pytest.fixture(scope="module")
def sparse64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB reserved NTFS volume with 12 MiB of random data; its free space is file holes."""
    d = tmp_path_factory.mktemp("usedspace")
    vol = make_reserved(d / "plain.img", 64, 12)
    assert os.stat(vol).st_blocks * 512 < 40 * MiB, "the test volume should be sparse"
    return vol


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


def _used_clusters_equal(got: bytes, want: bytes, off: int, fm) -> bool:  # type: ignore[no-untyped-def]
    """``got`` and ``want`` (the MiB at ``off``) agree on every cluster NTFS uses."""
    used = fm.used_in(off, len(want))
    cs = fm.cluster_size
    for i, u in enumerate(used):
        if u and got[i * cs:(i + 1) * cs] != want[i * cs:(i + 1) * cs]:
            return False
    return True


def _check_readers(vol: Path, orig: Path, rp: str, tmp: Path, files: bool = True) -> None:
    """pybde and our decrypt return every used cluster of ``orig`` (free space is noise where it
    was left unwritten, as after Windows' used-space-only encryption); ntfs-3g reads every file
    of our decrypted volume (the test volumes' files: ``files``) with the original's content and
    ``ntfsfix -n`` finds it clean."""
    from templatetool.bitlocker import open_fve
    from templatetool.catalog.ntfs import ntfs_free_map

    from .test_bitlocker_common import FILES, ntfs_file_hashes, ntfsfix_clean

    require_module("pybde")
    import pybde  # type: ignore[import-not-found]

    o = RawFile(orig)
    fm = ntfs_free_map(o)
    spans = open_fve(RawFile(vol)).regions().spans()
    dec = tmp / "dec.img"
    cp = run_cli("decrypt", str(vol), "-o", str(dec), "--recovery-password-file", str(tmp / "rp.txt"))
    assert cp.returncode == 0, cp.stderr
    ours = RawFile(dec)
    vf = pybde.volume()
    vf.set_recovery_password(rp)
    vf.open(str(vol))
    try:
        for off in range(0, o.size, MiB):
            n = min(MiB, o.size - off)
            if any(ro < off + n and off < ro + rn for ro, rn in spans):
                continue  # BitLocker's own regions (FVE2 files) read as zeros by every reader
            vf.seek_offset(off)
            want = o.read(off, n)
            assert _used_clusters_equal(vf.read_buffer(n), want, off, fm), f"pybde: a used cluster differs at {off:#x}"
            assert _used_clusters_equal(ours.read(off, n), want, off, fm), f"decrypt: a used cluster differs at {off:#x}"
    finally:
        vf.close()
    assert ntfsfix_clean(dec).returncode == 0
    if files:
        names = [*FILES, "random.bin"]
        assert ntfs_file_hashes(dec, names) == ntfs_file_hashes(orig, names)


def test_used_space_only_leaves_free_holes_and_reads_back(sparse64: Path, tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    shutil.copyfile(sparse64, vol)  # (a dense copy: no holes, nothing to skip)
    cp = run_cli("encrypt", str(vol), "--in-place", "--used-space-only", "--recovery-password-out",
                 str(tmp_path / "rp0.txt"), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["skipped_bytes"] == 0  # allocated zeros are encrypted (no holes)

    vol = tmp_path / "sparse.img"
    os.system(f"cp --sparse=always {sparse64} {vol}")
    before = _allocated(vol)
    rpf = tmp_path / "rp.txt"
    cp = run_cli("encrypt", str(vol), "--in-place", "--used-space-only", "--recovery-password-out", str(rpf), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["skipped_bytes"] >= 20 * MiB, doc
    # only the converted steps (and the journal area inside them) can allocate: skipped ones stay holes
    assert _allocated(vol) <= before + doc["volume_size"] - doc["skipped_bytes"], (before, _allocated(vol))
    assert _allocated(vol) < doc["volume_size"] - 16 * MiB
    _check_readers(vol, sparse64, rpf.read_text().strip(), tmp_path)


def test_without_the_flag_free_space_is_converted(sparse64: Path, tmp_path: Path) -> None:
    vol = tmp_path / "sparse.img"
    os.system(f"cp --sparse=always {sparse64} {vol}")
    cp = run_cli("encrypt", str(vol), "--in-place", "--recovery-password-out", str(tmp_path / "rp.txt"), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["skipped_bytes"] == 0
    assert _allocated(vol) >= 60 * MiB


def test_used_space_only_killed_then_resumed(sparse64: Path, tmp_path: Path) -> None:
    """SIGKILL part-way (by bytes written), then `resume` (which converts every step it redoes):
    the volume is complete and reads back right."""
    vol = tmp_path / "sparse.img"
    os.system(f"cp --sparse=always {sparse64} {vol}")
    rpf = tmp_path / "rp.txt"
    _, killed = run_and_kill(["encrypt", str(vol), "--in-place", "--used-space-only", "--recovery-password-out",
                              str(rpf)], wchar=6 * MiB)
    assert killed and rpf.exists()
    cp = run_cli("resume", str(vol), "--recovery-password-file", str(rpf))
    assert cp.returncode == 0, cp.stderr
    _check_readers(vol, sparse64, rpf.read_text().strip(), tmp_path)


def test_vhdx_stays_small(protected_vhdx: Path, tmp_path: Path) -> None:  # noqa: F811
    """A dynamic VHDX converted in place with --used-space-only keeps its size (free blocks stay
    unallocated); qemu-img check is clean; pybde reads the used clusters of the original."""
    require_tool("qemu-img")
    import subprocess

    vhdx = tmp_path / "t.vhdx"
    shutil.copyfile(protected_vhdx, vhdx)
    orig_raw, off, size = _vhdx_partition(protected_vhdx, tmp_path / "orig.raw")
    before = vhdx.stat().st_size
    rpf = tmp_path / "rp.txt"
    cp = run_cli("encrypt", str(vhdx), "--in-place", "--used-space-only", "--recovery-password-out", str(rpf), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["skipped_bytes"] > 0
    # skipped blocks stay unallocated: growth is bounded by the converted bytes, and far below
    # what the same conversion without the flag allocates
    grown = vhdx.stat().st_size - before
    assert grown <= doc["volume_size"] - doc["skipped_bytes"], (before, vhdx.stat().st_size)
    full = tmp_path / "full.vhdx"
    shutil.copyfile(protected_vhdx, full)
    cp = run_cli("encrypt", str(full), "--in-place", "--recovery-password-out", str(tmp_path / "rp-full.txt"))
    assert cp.returncode == 0, cp.stderr
    assert full.stat().st_size - before >= grown + doc["skipped_bytes"] // 2, (grown, full.stat().st_size - before)
    assert subprocess.run(["qemu-img", "check", "-f", "vhdx", str(vhdx)], capture_output=True).returncode == 0
    enc_raw, off2, size2 = _vhdx_partition(vhdx, tmp_path / "enc.raw")
    assert (off2, size2) == (off, size)
    # the OS volumes as files, for the readers
    for src, dst in ((orig_raw, tmp_path / "orig.vol"), (enc_raw, tmp_path / "enc.vol")):
        with open(src, "rb") as f, open(dst, "wb") as g:
            f.seek(off)
            left = size
            while left:
                b = f.read(min(MiB, left))
                g.write(b)
                left -= len(b)
    _check_readers(tmp_path / "enc.vol", tmp_path / "orig.vol", rpf.read_text().strip(), tmp_path, files=False)


def test_used_space_only_needs_in_place(sparse64: Path, tmp_path: Path) -> None:
    cp = run_cli("encrypt", str(sparse64), "-o", str(tmp_path / "o.img"), "--used-space-only",
                 "--recovery-password-out", str(tmp_path / "rp.txt"))
    assert_clean_error(cp, 2)
    assert "--used-space-only" in cp.stderr and not (tmp_path / "o.img").exists()
