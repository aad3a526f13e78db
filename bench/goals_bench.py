"""Issue 15's goal list in one run: every command against its peer, with the target and PASS/MISS.

    python bench/run.py --only goals --size-mib 1024      (what `make bench` runs)
    BENCH_COLD=1 python bench/run.py --only goals ...     (page cache dropped before every timed run)

Data (built once, untimed): a GPT disk (dynamic VHDX) with an NTFS volume holding 70 % of
SIZE MiB in random files (ntfs-3g), not reserved for BitLocker: "dense" = SIZE MiB virtual,
"sparse" = 64 × SIZE MiB virtual with the same files. From them, untimed: the protected template,
an encrypted disk, the encrypted and the plaintext volume as raw files.

Timed, interleaved rep by rep (each tool started from the same cache state: input read into the
page cache then ``sync``, or with ``BENCH_COLD=1`` ``sync`` + ``drop_caches`` before every timed
run of either tool; every run followed by ``sync``), medians of REPS with min–max spread:

| ours (the CLI) | peer |
|---|---|
| ``encrypt DISK -o OUT.vhdx`` (not reserved) | ``qemu-img convert -f vhdx -O vhdx -o subformat=dynamic DISK`` |
| ``protect DISK -o T.vhdx`` | the same qemu-img convert of DISK |
| ``shield T.vhdx`` | ``qemu-img convert`` of T.vhdx |
| ``decrypt VOL.raw -o OUT.raw`` (encrypted raw volume) | ``dislocker-file -V VOL.raw OUT.raw`` |
| ``vsc verify T.vhdx`` | ``sha256sum T.vhdx`` |
| ``encrypt --in-place VOL.raw`` (reserved raw volume) | ``qemu-img convert -f raw -O vhdx`` of it |

and, for every command, sparse time / dense time (target ≤ 1.2) and the peak RSS of the largest
process (``/usr/bin/time -v``, target ≤ 150 MiB) on both disks. ``encrypt --in-place`` on the
sparse volume would convert 64 × the bytes (in-place conversion still encrypts free space): it
is not run and its cost row is reported as MISS.

``BENCH_GOALS=decrypt`` runs the decrypt goal alone (dense disk only): ``decrypt VOL.raw -o
OUT.raw`` and the same with ``TEMPLATETOOL_DIRECT_IO=0`` (buffered writes), each against
``dislocker-file`` in the same reps.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import shield_bench as SB  # noqa: E402 - the disk builder and the identities

MiB = 1 << 20
TT = [sys.executable, "-m", "templatetool.cli.main", "-q"]
COLD = os.environ.get("BENCH_COLD") == "1"


def _prep(*inputs: Path) -> None:
    """The same cache state before every timed run of either tool."""
    os.sync()
    if COLD:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    from templatetool.blockdev import RawFile

    for p in inputs:  # the data extents only: reading a 64 GiB sparse file's holes would fill
        f = RawFile(p)  # (and evict) the page cache with zero pages
        try:
            for o, n in f.allocated_ranges():
                for off in range(o, o + n, 8 * MiB):
                    f.read(off, min(8 * MiB, o + n - off))
        finally:
            f.close()
    os.sync()


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds including the final sync, peak RSS KiB of the largest process)."""
    t0 = time.perf_counter()
    cp = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, **(env or {})})
    if cp.returncode != 0:
        msg = [ln for ln in cp.stderr.splitlines() if "error" in ln.lower()]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {msg[-3:] or cp.stderr[-400:]}")
    os.sync()
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", cp.stderr)
    return wall, int(m.group(1)) if m else -1


def _extract(disk: Path, out: Path) -> None:
    """The OS volume of ``disk`` as a sparse raw file."""
    from templatetool.blockdev import CHUNK, is_zero
    from templatetool.disk import find_os_volume, open_disk, read_partition_table

    d = open_disk(disk)
    try:
        v = find_os_volume(read_partition_table(d), d).view(d)
        with open(out, "wb") as f:
            f.truncate(v.size)
            for o, n in v.allocated_ranges():
                for pos in range(o, o + n, CHUNK):
                    data = v.read(pos, min(CHUNK, o + n - pos))
                    if not is_zero(data):
                        f.seek(pos)
                        f.write(data)
    finally:
        d.close()


class _Runs:
    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}
        self.rss: dict[str, int] = {}

    def add(self, key: str, res: tuple[float, int]) -> None:
        self.t.setdefault(key, []).append(res[0])
        self.rss[key] = max(self.rss.get(key, 0), res[1])

    def med(self, key: str) -> float:
        return statistics.median(self.t[key])


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}"


def run_decrypt(size_mib: int = 1024, reps: int = 3) -> dict[str, Any]:
    """The decrypt goal alone: raw volume -> raw, direct and buffered output, vs dislocker-file."""
    for tool in ("mkntfs", "sgdisk", "ntfs-3g", "dislocker-file", "ntfscp"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed")
    used = max(16, size_mib * 7 // 10)
    R = _Runs()
    with tempfile.TemporaryDirectory(prefix="goals-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        t = Path(tmp)
        g = SB.make_disk(t, size_mib, used, "dense")
        enc, rp = t / "dense-enc.vhdx", t / "dense.rp"
        SB._run([*TT, "encrypt", str(g), "-o", str(enc), "--recovery-password-out", str(rp)], cwd=ROOT)
        encvol = t / "enc-vol.raw"
        _extract(enc, encvol)
        out = t / "out.raw"
        for rep in range(reps):
            for key, env in (("decrypt raw", {}), ("decrypt raw buffered", {"TEMPLATETOOL_DIRECT_IO": "0"})):
                _prep(encvol)
                R.add(key, _timed([*TT, "decrypt", str(encvol), "-o", str(out), "--recovery-password-file", str(rp)],
                                  env=env))
                out.unlink()
            _prep(encvol)
            R.add("dislocker", _timed(["dislocker-file", "-V", str(encvol), "-p" + rp.read_text().strip(), str(out)]))
            out.unlink()
            print(f"  rep {rep + 1}/{reps} done", flush=True)
    cold = " cold" if COLD else ""
    rows: list[dict[str, Any]] = []
    for what, key in ((f"decrypt, raw volume of {size_mib} MiB", "decrypt raw"),
                      (f"decrypt, raw volume of {size_mib} MiB, DIRECT_IO=0", "decrypt raw buffered")):
        per = [p / o for o, p in zip(R.t[key], R.t["dislocker"], strict=True)]
        rows.append({"what": what + cold, "ours_s": R.med(key), "peer": "dislocker-file", "peer_s": R.med("dislocker"),
                     "ours_spread": _spread(R.t[key]), "peer_spread": _spread(R.t["dislocker"]),
                     "ratios": " ".join(f"{r:.2f}" for r in per), "target": 2.0, "bytes": size_mib * MiB})
    checks = [{"what": f"peak RSS, {k}", "value": R.rss[k] / 1024, "target": 150, "op": "<=",
               "detail": "MiB, largest process (time -v)"} for k in ("decrypt raw", "decrypt raw buffered")]
    return {"name": "goals (decrypt)", "rows": rows, "checks": checks,
            "extra": {"cache": "cold (drop_caches before every timed run)" if COLD else "warm input, + sync",
                      "reps": reps}}


def _compile() -> None:
    """Byte-compile the package first, as an install does: with PYTHONDONTWRITEBYTECODE set (this
    VM's shells) every timed run would otherwise compile templatetool's sources again (0.1-0.3 s
    each, more with a cold cache), a cost no installed user pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "templatetool")], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})


def run(size_mib: int = 1024, reps: int = 3) -> dict[str, Any]:
    _compile()
    if os.environ.get("BENCH_GOALS") == "decrypt":
        return run_decrypt(size_mib, reps)
    for tool in ("qemu-img", "mkntfs", "sgdisk", "ntfs-3g", "sha256sum", "dislocker-file", "ntfscp"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed")
    used = max(16, size_mib * 7 // 10)
    R = _Runs()
    with tempfile.TemporaryDirectory(prefix="goals-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        t = Path(tmp)
        SB._identities(t)
        signer = f"pem:{t / 'signer.key.pem'},{t / 'signer.pem'}"
        disks: dict[str, dict[str, Path]] = {}
        for label, virtual in (("dense", size_mib), ("sparse", 64 * size_mib)):
            g = SB.make_disk(t, virtual, used, label)
            # make_disk creates "System Volume Information" and no reservation: what encrypt must add
            tmpl = t / f"{label}-t.vhdx"
            SB._run([*TT, "protect", str(g), "-o", str(tmpl), "--name", "Bench", "--version", "1.0.0.0", "--signer", signer], cwd=ROOT)
            SB._run([*TT, "vsc", "export", str(tmpl), "-o", str(t / f"{label}.vsc")], cwd=ROOT)
            SB._run([*TT, "pdk", "new", "-o", str(t / f"{label}.pdk"), "--owner", str(t / "owner"), "--guardian", str(t / "fabric"), "--vsc", str(t / f"{label}.vsc"), "--version-rule", "ge", "--policy", "shielded", "--allow-untrusted-root"], cwd=ROOT)
            enc = t / f"{label}-enc.vhdx"
            SB._run([*TT, "encrypt", str(g), "-o", str(enc), "--recovery-password-out", str(t / f"{label}.rp")],
                    cwd=ROOT)
            disks[label] = {"golden": g, "tmpl": tmpl, "enc": enc, "rp": t / f"{label}.rp"}
        d = disks["dense"]
        encvol, plainvol = t / "enc-vol.raw", t / "plain-vol.raw"
        _extract(d["enc"], encvol)
        _extract(d["tmpl"], plainvol)  # reserved by protect: what --in-place needs
        sparsevol = t / "sparse-vol.raw"  # the 64x-virtual template's volume (a sparse file)
        _extract(disks["sparse"]["tmpl"], sparsevol)
        inplace = t / "inplace.raw"
        out = t / "out"
        for rep in range(reps):
            for label in ("dense", "sparse"):
                x = disks[label]
                _prep(x["golden"])
                R.add(f"encrypt {label}", _timed([*TT, "encrypt", str(x["golden"]), "-o", str(out) + ".vhdx", "--recovery-password-out", str(out) + ".rp"]))
                for f in t.glob("out.*"):
                    f.unlink()
                _prep(x["golden"])
                R.add(f"qemu golden {label}", _timed(["qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", "-o",
                                                      "subformat=dynamic", str(x["golden"]), str(out) + ".vhdx"]))
                (t / "out.vhdx").unlink()
                _prep(x["golden"])
                R.add(f"protect {label}", _timed([*TT, "protect", str(x["golden"]), "-o", str(out) + ".vhdx", "--name", "Bench", "--version", "1.0.0.0", "--signer", signer]))
                (t / "out.vhdx").unlink()
                _prep(x["tmpl"])
                R.add(f"shield {label}", _timed([*TT, "shield", str(x["tmpl"]), "--pdk", str(t / f"{label}.pdk"), "--owner", str(t / "owner"), "--guardian", str(t / "fabric"), "-o", str(out) + ".vhdx", "--pcr-values", "7=" + "00" * 32 + ",11=" + "00" * 32]))
                for f in t.glob("out.*"):
                    f.unlink()
                _prep(x["tmpl"])
                R.add(f"qemu tmpl {label}", _timed(["qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", "-o",
                                                    "subformat=dynamic", str(x["tmpl"]), str(out) + ".vhdx"]))
                (t / "out.vhdx").unlink()
                _prep(x["enc"])
                R.add(f"decrypt vhdx {label}", _timed([*TT, "decrypt", str(x["enc"]), "-o", str(out) + ".vhdx", "--recovery-password-file", str(x["rp"])]))
                (t / "out.vhdx").unlink()
                _prep(x["tmpl"])
                R.add(f"verify {label}", _timed([*TT, "vsc", "verify", str(x["tmpl"]), "--trust", str(t / "signer.pem")]))
            _prep(encvol)
            R.add("decrypt raw", _timed([*TT, "decrypt", str(encvol), "-o", str(out) + ".raw", "--recovery-password-file", str(d["rp"])]))
            (t / "out.raw").unlink()
            _prep(encvol)
            R.add("dislocker", _timed(["dislocker-file", "-V", str(encvol), "-p" + d["rp"].read_text().strip(),
                                       str(out) + ".raw"]))
            (t / "out.raw").unlink()
            _prep(d["tmpl"])
            R.add("sha256sum", _timed(["sha256sum", str(d["tmpl"])]))
            subprocess.run(["cp", "--sparse=always", str(plainvol), str(inplace)], check=True)
            _prep(inplace)
            bek = t / "ip.bek"
            bek.unlink(missing_ok=True)
            R.add("inplace", _timed([*TT, "encrypt", str(inplace), "--in-place", "--startup-key-out", str(bek)]))
            subprocess.run(["cp", "--sparse=always", str(plainvol), str(inplace)], check=True)
            _prep(inplace)
            R.add("qemu inplace", _timed(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                                          str(inplace), str(out) + ".vhdx"]))
            (t / "out.vhdx").unlink()
            for label, vol in (("dense", plainvol), ("sparse", sparsevol)):
                subprocess.run(["cp", "--sparse=always", str(vol), str(inplace)], check=True)
                _prep(inplace)
                bek.unlink(missing_ok=True)
                R.add(f"inplace uso {label}", _timed([*TT, "encrypt", str(inplace), "--in-place", "--used-space-only",
                                                      "--startup-key-out", str(bek)]))
            inplace.unlink()
            print(f"  rep {rep + 1}/{reps} done", flush=True)
    cold = " cold" if COLD else ""
    rows: list[dict[str, Any]] = []

    def row(what: str, ours: str, peer_name: str, peer: str, target: float) -> None:
        per = [p / o for o, p in zip(R.t[ours], R.t[peer], strict=True)]
        rows.append({"what": what + cold, "ours_s": R.med(ours), "peer": peer_name, "peer_s": R.med(peer),
                     "ours_spread": _spread(R.t[ours]), "peer_spread": _spread(R.t[peer]),
                     "ratios": " ".join(f"{r:.2f}" for r in per), "target": target,
                     "bytes": size_mib * MiB})

    warm_t = 1.0 if COLD else 1.25
    row(f"encrypt (not reserved), {size_mib} MiB, {used} used", "encrypt dense", "qemu-img convert -O vhdx",
        "qemu golden dense", warm_t)
    row(f"shield dense, {size_mib} MiB", "shield dense", "qemu-img convert -O vhdx", "qemu tmpl dense", warm_t)
    row(f"shield sparse, {64 * size_mib} MiB virtual / {used} used", "shield sparse", "qemu-img convert -O vhdx",
        "qemu tmpl sparse", 2.0)
    row(f"protect dense, {size_mib} MiB", "protect dense", "qemu-img convert -O vhdx", "qemu golden dense", 1.0)
    row(f"decrypt, raw volume of {size_mib} MiB", "decrypt raw", "dislocker-file", "dislocker", 2.0)
    row(f"vsc verify, {size_mib} MiB template", "verify dense", "sha256sum of the template", "sha256sum", 1.5)
    row(f"encrypt --in-place, raw volume of {size_mib} MiB", "inplace", "qemu-img convert -O vhdx", "qemu inplace", 1.0)
    row(f"encrypt --in-place --used-space-only, raw volume of {size_mib} MiB", "inplace uso dense",
        "qemu-img convert -O vhdx", "qemu inplace", 1.0)
    checks: list[dict[str, Any]] = []
    for cmd in ("encrypt", "protect", "shield", "decrypt vhdx", "verify"):
        s, dn = R.med(f"{cmd} sparse"), R.med(f"{cmd} dense")
        checks.append({"what": f"{cmd}: 64x-virtual / dense time{cold}", "value": s / dn, "target": 1.2, "op": "<=",
                       "detail": f"{s:.2f} / {dn:.2f} s"})
    s, dn = R.med("inplace uso sparse"), R.med("inplace uso dense")
    checks.append({"what": f"encrypt --in-place --used-space-only: 64x-virtual / dense time{cold}", "value": s / dn,
                   "target": 1.2, "op": "<=", "detail": f"{s:.2f} / {dn:.2f} s (without the flag the whole "
                   "volume is converted: 64x the bytes)"})
    for key in sorted(R.rss):
        if key.startswith(("qemu", "dislocker", "sha256sum")):
            continue
        checks.append({"what": f"peak RSS, {key}", "value": R.rss[key] / 1024, "target": 150, "op": "<=",
                       "detail": "MiB, largest process (time -v)"})
    return {"name": "goals", "rows": rows, "checks": checks,
            "extra": {"cache": "cold (drop_caches before every timed run)" if COLD else "warm input, + sync",
                      "reps": reps}}


if __name__ == "__main__":
    import json

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1024,
                         int(sys.argv[2]) if len(sys.argv) > 2 else 3), indent=2))
