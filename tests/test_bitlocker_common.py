"""Shared helpers for the BitLocker tests: small NTFS volumes and the three independent readers."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from .conftest import require_module, require_tool

#: Files put into every test NTFS volume (name -> content), hashed before and after.
FILES = {
    "big.bin": hashlib.sha256(b"seed-big").digest() * 9000,  # ~288 KiB, several clusters
    "hello.txt": b"hello from templatetool\n",
    "odd.dat": bytes(range(256)) * 37 + b"x",
}


def make_ntfs(path: Path, size_mib: int = 16, sector_size: int = 512) -> Path:
    """An NTFS volume image made by mkntfs with FILES copied in by ntfscp."""
    require_tool("mkntfs", "ntfscp")
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-s", str(sector_size), "-c", "4096", "-L", "ttest", str(path)],
                   check=True, capture_output=True)
    src = path.parent / f".{path.name}.files"
    src.mkdir(exist_ok=True)
    for name, data in FILES.items():
        (src / name).write_bytes(data)
        subprocess.run(["ntfscp", "-q", str(path), str(src / name), name], check=True, capture_output=True)
    return path


def ntfs_file_hashes(volume: Path, names=FILES) -> dict[str, str]:
    """sha256 of each file read back by ntfs-3g's ntfscat (an independent NTFS reader)."""
    require_tool("ntfscat")
    out = {}
    for name in names:
        cp = subprocess.run(["ntfscat", str(volume), name], capture_output=True, check=True)
        out[name] = hashlib.sha256(cp.stdout).hexdigest()
    return out


def expected_hashes() -> dict[str, str]:
    return {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}


def ntfsfix_clean(volume: Path) -> subprocess.CompletedProcess[str]:
    """``ntfsfix -n`` (no-action check) on a volume image."""
    require_tool("ntfsfix")
    return subprocess.run(["ntfsfix", "-n", str(volume)], capture_output=True, text=True)


def file_sha256(path: Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    left = length if length is not None else os.path.getsize(path)
    with open(path, "rb") as f:
        while left > 0:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def pybde_sha256(img: Path, length: int, *, recovery_password: str | None = None, password: str | None = None,
                 bek_path: Path | None = None) -> str:
    """Decrypt with libbde-python and hash the first ``length`` bytes."""
    pybde = require_module("pybde")
    v = pybde.volume()
    if recovery_password:
        v.set_recovery_password(recovery_password)
    if password:
        v.set_password(password)
    if bek_path:
        v.read_startup_key(str(bek_path))
    v.open(str(img))
    try:
        assert not v.is_locked(), "pybde could not unlock"
        h = hashlib.sha256()
        pos = 0
        while pos < length:
            n = min(1 << 20, length - pos)
            h.update(v.read_buffer_at_offset(n, pos))
            pos += n
        return h.hexdigest()
    finally:
        v.close()


def dissect_sha256(img: Path, length: int, *, recovery_password: str | None = None, password: str | None = None,
                   bek_path: Path | None = None, clear: bool = False,
                   spans: list[tuple[int, int]] | None = None) -> str:
    """Decrypt with dissect.fve and hash the first ``length`` bytes (or only ``spans``: dissect is
    pure Python per sector, ~3 MB/s here)."""
    require_module("dissect.fve")
    from dissect.fve.bde import BDE

    with open(img, "rb") as fh:
        b = BDE(fh)
        if recovery_password:
            b.unlock_with_recovery_password(recovery_password)
        elif password:
            b.unlock_with_passphrase(password)
        elif bek_path:
            with open(bek_path, "rb") as kf:
                b.unlock_with_bek(kf)
        elif clear:
            b.unlock_with_clear_key()
        s = b.open()
        h = hashlib.sha256()
        if spans is not None:
            for off, n in spans:
                s.seek(off)
                h.update(s.read(n))
            return h.hexdigest()
        pos = 0
        while pos < length:
            d = s.read(min(1 << 20, length - pos))
            if not d:
                break
            h.update(d)
            pos += len(d)
        return h.hexdigest()


def dislocker_decrypt(img: Path, out: Path, *, recovery_password: str | None = None, password: str | None = None,
                      bek_path: Path | None = None, clear: bool = False) -> Path:
    """Decrypt with dislocker-file into ``out`` (removed first: dislocker never overwrites)."""
    require_tool("dislocker-file")
    if out.exists():
        out.unlink()
    args = ["dislocker-file", "-V", str(img)]
    if recovery_password:
        args.append(f"-p{recovery_password}")
    elif password:
        args.append(f"-u{password}")
    elif bek_path:
        args += ["-f", str(bek_path)]
    elif clear:
        args.append("-c")
    cp = subprocess.run(args + ["--", str(out)], capture_output=True, text=True)
    assert cp.returncode == 0 and out.exists(), f"dislocker-file failed: {cp.stdout[-2000:]} {cp.stderr[-2000:]}"
    return out


def spans_sha256(read, spans: list[tuple[int, int]]) -> str:
    """Hash ``read(off, n)`` over spans (same order as dissect_sha256 with spans)."""
    h = hashlib.sha256()
    for off, n in spans:
        h.update(read(off, n))
    return h.hexdigest()


def check_spans(size: int, regions, extra: int = 1 << 20) -> list[tuple[int, int]]:
    """Spans worth comparing when a full read is too slow: start, the FVE regions' edges, the end."""
    spans = [(0, min(size, extra))]
    for o, n in regions.spans():
        lo = max(0, o - 4096)
        spans.append((lo, min(size, o + n + 4096) - lo))
    spans.append((max(0, size - extra), min(size, extra)))
    return spans


def clusters_overlapping(volume: Path, spans: list[tuple[int, int]]) -> list[str]:
    """Names of NTFS records (other than the FVE2 files) whose non-resident attributes use a
    cluster inside ``spans`` — read with dissect.ntfs, independent of ntfs-3g."""
    require_module("dissect.ntfs")
    from dissect.ntfs import NTFS

    hits = []
    with open(volume, "rb") as fh:
        fs = NTFS(fh)
        cs = fs.cluster_size
        for rec in fs.mft.segments():
            try:
                if not rec.header:
                    continue
                name = rec.filename or f"#{rec.segment}"
                attrs = [a for lst in rec.attributes.values() for a in lst]
            except Exception:  # noqa: BLE001 - unused/corrupt slots
                continue
            if name.startswith("FVE2.{"):
                continue
            for a in attrs:
                if a.header.resident:
                    continue
                for lcn, count in a.header.dataruns():
                    if lcn is None:
                        continue
                    lo, hi = lcn * cs, (lcn + count) * cs
                    if any(lo < o + n and o < hi for o, n in spans):
                        hits.append(name)
    return hits
