"""Benchmark: protect and shield on a realistic template vs peers, sparse scaling and peak RSS.

    python bench/shield_bench.py [USED_MIB] [REPS]

Builds a GPT disk with one NTFS volume holding USED_MIB of random files (ntfs-3g), as a dynamic
VHDX, twice: virtual size = used + 64 MiB ("dense") and virtual = 64 × used ("sparse"). Then:
- shield (CLI, timed with /usr/bin/time -v for peak RSS) vs `qemu-img convert -O vhdx` of the
  same template, each followed by sync and each started with the template in the page cache;
- protect vs `sha256sum` of the raw volume;
- sparse/dense shield time ratio (target ≤ 1.2) and peak RSS of both.
Medians of REPS runs. Needs root (ntfs-3g FUSE mount), qemu-img, sgdisk, mkntfs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
TT = [sys.executable, "-m", "templatetool.cli.main", "-q"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def make_disk(folder: Path, virtual_mib: int, used_mib: int, name: str) -> Path:
    """A GPT disk (dynamic VHDX) with one NTFS volume holding ``used_mib`` of random files."""
    vol = folder / f"{name}.vol"
    vol_size = (virtual_mib - 12) * MiB
    with open(vol, "wb") as f:
        f.truncate(vol_size)
    _run(["mkntfs", "-F", "-Q", "-q", "-s", "512", "-c", "4096", "-p", str(11 * 2048), "-H", "255", "-S", "63", str(vol)])
    mnt = folder / f"{name}.mnt"
    mnt.mkdir()
    _run(["ntfs-3g", str(vol), str(mnt)])
    try:
        (mnt / "System Volume Information").mkdir()
        left = used_mib
        i = 0
        while left > 0:
            n = min(64, left)
            with open(mnt / f"file{i:04d}.bin", "wb") as f:
                for _ in range(n):
                    f.write(os.urandom(MiB))
            left -= n
            i += 1
    finally:
        _run(["umount", str(mnt)])
    raw = folder / f"{name}.raw"
    with open(raw, "wb") as f:
        f.truncate(virtual_mib * MiB)
    _run(["sgdisk", "-o", "-n", "1:2048:22527", "-t", "1:EF00",
          "-n", f"2:22528:{22528 + vol_size // 512 - 1}", "-t", "2:0700", str(raw)])
    esp = folder / f"{name}.esp"
    with open(esp, "wb") as f:
        f.truncate(10 * MiB)
    _run(["mkfs.vfat", "-F", "16", "-n", "SYSTEM", str(esp)])
    with open(raw, "r+b") as f:
        f.seek(MiB)
        f.write(esp.read_bytes())
    esp.unlink()
    fd_in, fd_out = os.open(vol, os.O_RDONLY), os.open(raw, os.O_RDWR)
    try:
        pos = 0
        while pos < vol_size:
            try:
                data = os.lseek(fd_in, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd_in, data, os.SEEK_HOLE)
            p = data
            while p < hole:
                buf = os.pread(fd_in, min(8 * MiB, hole - p), p)
                os.pwrite(fd_out, buf, 11 * MiB + p)
                p += len(buf)
            pos = hole
    finally:
        os.close(fd_in)
        os.close(fd_out)
    vol.unlink()
    out = folder / f"{name}.vhdx"
    _run(TT + ["vhdx", "convert", str(raw), str(out)], cwd=ROOT)
    raw.unlink()
    return out


def _tree_pss_kib(root: int) -> int:
    """Proportional set size (KiB) of ``root`` and all its descendants (shared pages split)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for ln in f:
                    if ln.startswith("Pss:"):
                        total += int(ln.split()[1])
                        break
        except OSError:
            pass
    return total


def _timed_rss(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds (incl. sync), peak RSS in KiB of the largest single process (``time -v``:
    the CLI or one of its workers) and peak PSS in KiB of the whole process tree (sampled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    import threading

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_pss_kib(proc.pid))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        msg = [ln for ln in err.splitlines() if ln.startswith("templatetool")]
        raise RuntimeError(f"{' '.join(cmd[-8:])} failed: {msg or err[-400:]}")
    os.sync()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return time.perf_counter() - t0, int(m.group(1)) if m else -1, peak[0]


COLD = os.environ.get("BENCH_COLD") == "1"


def _warm(path: Path) -> None:
    """Start both tools from the same cache state. Default: the input in the page cache (this
    VM's kernel reclaims page cache proactively: without this, runs flip between warm and cold
    input and the spread swamps the comparison). ``BENCH_COLD=1`` (root): drop the page cache
    instead, so input reads and output pages are cold for both. Then sync: no writeback pending."""
    if COLD:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    os.sync()


def _identities(t: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from templatetool.guardian.model import generate_guardian, save_guardian
    from templatetool.signers.certs import new_key, self_signed

    key = new_key("ec-p256")
    (t / "signer.key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (t / "signer.pem").write_bytes(self_signed("CN=Bench Signer", key, "signing").public_bytes(serialization.Encoding.PEM))
    save_guardian(generate_guardian("Owner", "ec-p256"), t / "owner", None)
    save_guardian(generate_guardian("Fabric", "ec-p256"), t / "fabric", None)


def run(size_mib: int = 256, reps: int = 3) -> dict:
    for tool in ("qemu-img", "mkntfs", "sgdisk", "ntfs-3g", "sha256sum"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed")
    rows = []
    extra: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="shield-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        t = Path(tmp)
        _identities(t)
        results: dict[str, dict[str, float]] = {}
        for label, virtual in (("dense", size_mib + 80), ("sparse", 64 * size_mib)):
            golden = make_disk(t, virtual, size_mib, label)
            tmpl = t / f"{label}-template.vhdx"
            prot_s, prot_rss, _pss = _timed_rss(TT + ["protect", str(golden), "-o", str(tmpl), "--name", "Bench",
                                                 "--version", "1.0.0.0", "--signer",
                                                 f"pem:{t / 'signer.key.pem'},{t / 'signer.pem'}"])
            _run(TT + ["vsc", "export", str(tmpl), "-o", str(t / f"{label}.vsc")], cwd=ROOT)
            _run(TT + ["pdk", "new", "-o", str(t / f"{label}.pdk"), "--owner", str(t / "owner"), "--guardian",
                       str(t / "fabric"), "--vsc", str(t / f"{label}.vsc"), "--version-rule", "ge", "--policy", "shielded",
                       "--allow-untrusted-root"], cwd=ROOT)
            sh, rss, pss, qm = [], [], [], []
            for i in range(reps):
                out = t / f"{label}-vm{i}.vhdx"
                _warm(tmpl)
                s, r, ps = _timed_rss(TT + ["shield", str(tmpl), "--pdk", str(t / f"{label}.pdk"), "--owner", str(t / "owner"),
                                        "--guardian", str(t / "fabric"), "-o", str(out), "--pcr-values",
                                        "7=" + "00" * 32 + ",11=" + "00" * 32])
                sh.append(s)
                rss.append(r)
                pss.append(ps)
                for f in (out, out.with_suffix(".kp"), out.with_suffix(".recovery.p7m")):
                    f.unlink(missing_ok=True)
                _warm(tmpl)
                q0 = time.perf_counter()
                _run(["qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", "-o", "subformat=dynamic", str(tmpl),
                      str(t / "q.vhdx")])
                os.sync()
                qm.append(time.perf_counter() - q0)
                (t / "q.vhdx").unlink()
            results[label] = {"shield": statistics.median(sh), "qemu": statistics.median(qm),
                              "rss_mib": max(rss) / 1024, "pss_mib": max(pss) / 1024, "protect": prot_s, "protect_rss_mib": prot_rss / 1024}
            rows.append({"what": f"shield, {label}{' cold' if COLD else ''} ({virtual} MiB virtual, {size_mib} MiB used)",
                         "ours_s": results[label]["shield"], "peer": "qemu-img convert -O vhdx + sync",
                         "peer_s": results[label]["qemu"], "bytes": size_mib * MiB})
            golden.unlink()
            tmpl.unlink()
        extra["sparse/dense shield time (target <= 1.2)"] = round(results["sparse"]["shield"] / results["dense"]["shield"], 3)
        extra["peak RSS of one process (time -v), shield dense / sparse MiB (target <= 150)"] = (round(results["dense"]["rss_mib"], 1),
                                                                      round(results["sparse"]["rss_mib"], 1))
        extra["peak PSS of the whole process tree (CLI + workers), dense / sparse MiB"] = (
            round(results["dense"]["pss_mib"], 1), round(results["sparse"]["pss_mib"], 1))
        extra["protect dense / sparse s"] = (round(results["dense"]["protect"], 2), round(results["sparse"]["protect"], 2))
        extra["peak RSS protect dense / sparse MiB"] = (round(results["dense"]["protect_rss_mib"], 1),
                                                       round(results["sparse"]["protect_rss_mib"], 1))
    return {"name": "shield", "rows": rows, "extra": extra}


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(json.dumps(run(size, reps), indent=2))
