"""Benchmark: catalog measurement (parallel SHA-256 Merkle leaves) vs `sha256sum`, same bytes.

    python bench/catalog_bench.py [SIZE_MIB] [REPS]

``run(size_mib, reps)`` times, on one random file in a temp dir (page cache warmed first, so
both read from memory): our ``measure_volume`` over every byte (1 MiB blocks, all cores) and
``sha256sum`` of the same file (the issue's yardstick), plus ``openssl dgst -sha256`` (a
SHA-NI single-core ceiling) for honesty. Medians of ``reps`` runs; ``ratio`` = sha256sum / ours (> 1:
we are faster). Also reports a 1-thread measurement to show what the threads buy.
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

MiB = 1 << 20


def _time(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(size_mib: int = 256, reps: int = 3) -> dict:
    """Time our measurement against sha256sum on ``size_mib`` MiB of random data."""
    from templatetool.blockdev import RawFile
    from templatetool.catalog.measure import default_workers, measure_volume

    sha = shutil.which("sha256sum")
    with tempfile.TemporaryDirectory(prefix="tt-bench-catalog-") as td:
        p = Path(td) / "volume.img"
        with open(p, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        p.read_bytes() if size_mib <= 1024 else None  # warm the page cache

        def ours(workers: int | None = None) -> None:
            dev = RawFile(p)
            try:
                measure_volume(dev, MiB, free_space="none", workers=workers)
            finally:
                dev.close()

        def peer() -> None:
            subprocess.run([sha, str(p)], check=True, capture_output=True)  # type: ignore[list-item]

        ossl = shutil.which("openssl")

        def peer_openssl() -> None:
            subprocess.run([ossl, "dgst", "-sha256", str(p)], check=True, capture_output=True)  # type: ignore[list-item]

        ours()  # warm-up (thread pool, imports)
        ours_s = _time(ours, reps)
        ours1_s = _time(lambda: ours(1), reps)
        peer_s = _time(peer, reps) if sha else float("nan")
        ossl_s = _time(peer_openssl, reps) if ossl else float("nan")
    nbytes = size_mib * MiB
    return {
        "name": "catalog",
        "rows": [
            {"what": f"measure {size_mib} MiB, {default_workers()} threads", "ours_s": ours_s,
             "peer": "sha256sum (1 core)", "peer_s": peer_s, "bytes": nbytes},
            {"what": f"measure {size_mib} MiB, 1 thread", "ours_s": ours1_s,
             "peer": "sha256sum (1 core)", "peer_s": peer_s, "bytes": nbytes},
            {"what": f"measure {size_mib} MiB, {default_workers()} threads", "ours_s": ours_s,
             "peer": "openssl dgst -sha256 (1 core, SHA-NI)", "peer_s": ossl_s, "bytes": nbytes},
        ],
        "extra": {"ratio_vs_sha256sum": round(peer_s / ours_s, 2) if ours_s else None,
                  "threads_speedup": round(ours1_s / ours_s, 2) if ours_s else None,
                  "ratio_vs_openssl_dgst": round(ossl_s / ours_s, 2) if ours_s else None,
                  "ours_MBps": round(nbytes / ours_s / 1e6, 1), "sha256sum_MBps": round(nbytes / peer_s / 1e6, 1),
                  "openssl_dgst_MBps": round(nbytes / ossl_s / 1e6, 1)},
    }


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(json.dumps(run(size, reps), indent=2))
