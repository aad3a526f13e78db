"""BitLocker throughput: our encrypt_volume and decrypt vs dislocker-file and qemu-img convert.

``run(size_mib, reps)`` builds a random raw volume of ``size_mib`` MiB in a temp dir, then times
(medians over ``reps``; page cache warm, no fsync except what each tool does itself):

* ``encrypt``: :func:`templatetool.bitlocker.encrypt_volume` (XTS-AES-128, clear-key protector so no
  1M-round stretch is timed), raw file -> raw file;
* ``decrypt``: :func:`templatetool.bitlocker.volume.decrypt_volume` (forked workers) to a raw file;
* ``dislocker``: ``dislocker-file -c`` decrypting the same volume to a file;
* ``qemu_img``: ``qemu-img convert -f raw -O raw`` of the plaintext volume (a plain copy, the
  I/O baseline).

Returns MB/s (1e6 B/s) per operation and the ratios. Run: ``python bench/bitlocker_bench.py 256 3``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from templatetool.bitlocker.volume import (
    FveRegions,
    ProtectorSpec,
    decrypt_volume,
    encrypt_volume,
    open_fve,
)
from templatetool.blockdev import CHUNK, RawFile


def _make_volume(path: Path, size: int) -> FveRegions:
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        f.writelines(block[:min(CHUNK, size - pos)] if pos % (7 * CHUNK) else os.urandom(min(CHUNK, size - pos)) for pos in range(0, size, CHUNK))
    mid = size // 2 // 65536 * 65536
    regions = FveRegions((mid, mid + 0x10000, mid + 0x20000), mid + 0x30000)
    with open(path, "r+b") as f:  # reserved regions are zero, as after reserve_ntfs
        for o, n in regions.spans():
            f.seek(o)
            f.write(bytes(n))
    return regions


def _time(fn: Any, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def run(size_mib: int = 256, reps: int = 3) -> dict[str, Any]:
    """Time encrypt / decrypt / dislocker-file / qemu-img on one ``size_mib`` MiB volume."""
    size = size_mib << 20
    res: dict[str, Any] = {"size_mib": size_mib, "reps": reps, "unit": "MB/s (1e6 B/s), median"}
    with tempfile.TemporaryDirectory(prefix="tt-bde-bench-") as td:
        d = Path(td)
        plain, enc, dec = d / "plain.raw", d / "enc.raw", d / "dec.raw"
        regions = _make_volume(plain, size)

        def do_encrypt() -> None:
            src, dst = RawFile(plain), RawFile.create(enc, size)
            try:
                encrypt_volume(src, dst, protectors=[ProtectorSpec("clear")], regions=regions)
            finally:
                src.close()
                dst.close()

        def do_decrypt() -> None:
            dv = open_fve(RawFile(enc)).unlock(clear=True)
            out = RawFile.create(dec, size)
            try:
                decrypt_volume(dv, out)
            finally:
                out.close()

        t_enc = _time(do_encrypt, reps)
        t_dec = _time(do_decrypt, reps)
        res["encrypt"] = round(size / t_enc / 1e6, 1)
        res["decrypt"] = round(size / t_dec / 1e6, 1)
        if shutil.which("dislocker-file"):
            out = d / "dl.raw"

            def do_dislocker() -> None:
                if out.exists():
                    out.unlink()
                subprocess.run(["dislocker-file", "-c", "-V", str(enc), "--", str(out)], check=True,
                               capture_output=True)
            res["dislocker_decrypt"] = round(size / _time(do_dislocker, reps) / 1e6, 1)
            res["decrypt_vs_dislocker"] = round(res["decrypt"] / res["dislocker_decrypt"], 2)
            res["encrypt_vs_dislocker"] = round(res["encrypt"] / res["dislocker_decrypt"], 2)
            res["dislocker_output_matches"] = out.read_bytes() == dec.read_bytes() if size <= 1 << 30 else None
        if shutil.which("qemu-img"):
            cp = d / "copy.raw"

            def do_qemu() -> None:
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(plain), str(cp)], check=True)
            res["qemu_img_convert"] = round(size / _time(do_qemu, reps) / 1e6, 1)
            res["encrypt_vs_qemu_img"] = round(res["encrypt"] / res["qemu_img_convert"], 2)
            res["decrypt_vs_qemu_img"] = round(res["decrypt"] / res["qemu_img_convert"], 2)
    return res


if __name__ == "__main__":
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(json.dumps(run(mib, reps), indent=2))
