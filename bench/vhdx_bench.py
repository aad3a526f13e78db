"""Benchmark: our raw -> dynamic VHDX convert vs `qemu-img convert`, same data, same run.

    python bench/vhdx_bench.py [SIZE_MIB] [REPS]

``run(size_mib, reps)`` returns the median seconds of both tools and their ratio (ours / qemu;
below 1.0 means we are faster). Each timed run ends with ``sync`` so page-cache writeback counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20


def make_source(path: Path, size_mib: int, seed: int = 1) -> None:
    """A realistic mix: 60 % random data in runs of 1-8 MiB, 10 % compressible text, the rest holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        pos = 0
        while pos < size_mib:
            run = min(rnd.randint(1, 8), size_mib - pos)
            r = rnd.random()
            if r < 0.6:
                f.seek(pos * MiB)
                f.writelines(os.urandom(MiB) for _ in range(run))
            elif r < 0.7:
                f.seek(pos * MiB)
                f.write((b"templatetool benchmark text " * (MiB // 28 + 1))[:MiB] * run)
            pos += run
    os.sync()


def _timed(cmd: list[str] | None, fn=None) -> float:
    t0 = time.perf_counter()
    if cmd is not None:
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        fn()
    os.sync()
    return time.perf_counter() - t0


def run(size_mib: int = 512, reps: int = 3) -> dict[str, float | int]:
    """Median wall-clock seconds of our convert and of qemu-img convert (raw -> dynamic VHDX)."""
    from templatetool.vhdx import convert

    if shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img is needed for the comparison")
    with tempfile.TemporaryDirectory(prefix="vhdx-bench-") as tmp:
        t = Path(tmp)
        src = t / "src.raw"
        make_source(src, size_mib)
        ours, qemu = [], []
        for i in range(reps):
            dst_q = t / f"q{i}.vhdx"
            qemu.append(_timed(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                                str(src), str(dst_q)]))
            dst_o = t / f"o{i}.vhdx"
            ours.append(_timed(None, lambda d=dst_o: convert(src, d, subformat="dynamic", progress=False)))
            os.unlink(dst_q)
            os.unlink(dst_o)
        o, q = statistics.median(ours), statistics.median(qemu)
        return {"size_mib": size_mib, "reps": reps, "ours_s": round(o, 3), "qemu_s": round(q, 3),
                "ratio": round(o / q, 3), "ours_mib_s": round(size_mib / o, 1), "qemu_mib_s": round(size_mib / q, 1)}


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    res = run(size, reps)
    print(json.dumps(res))
    print(f"vhdx convert ratio (ours/qemu-img, lower is better): {res['ratio']}")
