"""In-place BitLocker conversion (`encrypt --in-place`) vs `qemu-img convert` of the same volume.

``run(size_mib, reps)`` makes an NTFS volume of ``size_mib`` MiB (mkntfs, the BitLocker
reservation by :func:`templatetool.bitlocker.reserve.reserve_ntfs`, ~80 % of it random data copied
in with ntfscp), then, interleaved rep by rep (medians of ``reps``; each run followed by ``sync``;
the input copied afresh and brought to the same cache state for both tools: warm, or dropped with
``BENCH_COLD=1`` as root):

* ours: ``templatetool encrypt VOL --in-place --startup-key-out K.BEK`` (the CLI, journal and
  fsyncs included);
* peer: ``qemu-img convert -f raw -O vhdx -o subformat=dynamic VOL OUT`` (a plain copy).

CPU seconds (user + sys of the process tree) are reported beside the wall times.
Run: ``python bench/run.py --only inplace --size-mib 1024``.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TT = [sys.executable, "-m", "templatetool.cli.main"]
MiB = 1 << 20
COLD = os.environ.get("BENCH_COLD") == "1"


def _make_volume(path: Path, size_mib: int) -> None:
    from templatetool.bitlocker.reserve import reserve_ntfs

    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-s", "512", "-c", "4096", "-L", "bench", str(path)],
                   check=True, capture_output=True)
    reserve_ntfs(path)
    fill = path.parent / "fill.bin"
    rnd = random.Random(15)
    with open(fill, "wb") as f:
        for _ in range(size_mib * 8 // 10):
            f.write(rnd.randbytes(MiB))
    subprocess.run(["ntfscp", "-q", str(path), str(fill), "random.bin"], check=True, capture_output=True)
    fill.unlink()


def _prepare(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.sync()
    if COLD:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        with open(dst, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the children) of ``cmd`` + sync."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    os.sync()
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def run(size_mib: int = 256, reps: int = 3) -> dict[str, Any]:
    """Time `encrypt --in-place` and `qemu-img convert` of one ``size_mib`` MiB volume."""
    with tempfile.TemporaryDirectory(prefix="tt-inplace-bench-", dir=os.environ.get("BENCH_TMP")) as td:
        d = Path(td)
        plain, vol, out, bek = d / "plain.img", d / "vol.img", d / "out.vhdx", d / "k.bek"
        _make_volume(plain, size_mib)
        ours, peer, ours_cpu, peer_cpu = [], [], [], []
        for _ in range(reps):
            _prepare(plain, vol)
            bek.unlink(missing_ok=True)
            w, c = _timed(TT + ["encrypt", str(vol), "--in-place", "--startup-key-out", str(bek)])
            ours.append(w)
            ours_cpu.append(c)
            _prepare(plain, vol)
            out.unlink(missing_ok=True)
            w, c = _timed(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                           str(vol), str(out)])
            peer.append(w)
            peer_cpu.append(c)
    cold = " cold" if COLD else ""
    return {
        "name": "inplace",
        "rows": [{"what": f"encrypt --in-place{cold}, {size_mib} MiB volume", "ours_s": statistics.median(ours),
                  "peer": "qemu-img convert -O vhdx", "peer_s": statistics.median(peer), "bytes": size_mib * MiB}],
        "extra": {
            "ours wall s (runs)": " ".join(f"{x:.2f}" for x in ours),
            "qemu-img wall s (runs)": " ".join(f"{x:.2f}" for x in peer),
            "ours CPU s (median)": f"{statistics.median(ours_cpu):.2f}",
            "qemu-img CPU s (median)": f"{statistics.median(peer_cpu):.2f}",
            "ratios per rep": " ".join(f"{p / o:.2f}" for o, p in zip(ours, peer, strict=True)),
            "target": ">= 1.0x",
        },
    }


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 256, int(sys.argv[2]) if len(sys.argv) > 2 else 3))
