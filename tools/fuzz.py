#!/usr/bin/env python3
"""Run every atheris harness in fuzz/ for a bounded time, seeded from the test corpus generator.

    .venv/bin/python tools/fuzz.py [--time 60] [--only kp,tcg_log] [--workdir DIR] [--json OUT]

Steps: build valid artifacts and the malformed corpus (tests/corpus_gen.py), write them as seed
corpora (WORKDIR/corpus/<harness>/), then run each harness in a subprocess for ``--time``
seconds (libFuzzer flags: -max_total_time, -timeout, -rss_limit_mb). A harness that finds a
crash is restarted for the rest of its time (up to ``--max-crashes``); each crashing input is
copied to tests/corpus/fuzz-crashes/<harness>/ with the exception summary beside it, so it
becomes a regression input. Prints a table (runs, execs/s, corpus size, crashes) and writes it
as JSON for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
CRASHES = ROOT / "tests" / "corpus" / "fuzz-crashes"

#: harness -> corpus kinds (tests/corpus_gen.py) that seed it
HARNESSES = {
    "vhdx": ["vhdx"], "gpt": ["gpt"], "fve": ["fve"], "bek": ["bek"], "recovery_password": ["recovery-password"],
    "tpm_protector": ["tpm-blob"], "tpm_parent": ["tpm-parent", "certificate"], "tcg_log": ["tcg-log"],
    "vsc": ["vsc"], "pdk": ["pdk"], "kp": ["kp"], "guardian_xml": ["guardian-xml"],
    "host_evidence": ["host-evidence"],
}
MAX_SEED = 2 << 20


def seed(workdir: Path, names: list[str]) -> dict[str, int]:
    """Write the seed corpora; returns the number of seeds per harness."""
    sys.path.insert(0, str(ROOT))
    from tests import corpus_gen as cg

    counts = {}
    with tempfile.TemporaryDirectory(prefix="fuzz-art-") as td:
        art = cg.make_artifacts(Path(td))
        seeds = cg.seed_inputs(art)
    for h in names:
        d = workdir / "corpus" / h
        d.mkdir(parents=True, exist_ok=True)
        n = 0
        kinds = HARNESSES[h] + (["fve-metadata"] if h == "fve" else [])
        for kind in kinds:
            for data in seeds.get(kind, []):
                data = data[:MAX_SEED]
                if kind == "fve-metadata":  # the harness's first byte selects header / metadata block / volume
                    variants = [b"\x01" + data]
                elif h == "fve":
                    variants = [b"\x00" + data[:512]]
                elif h in ("vsc", "pdk") and not data.startswith(b"\x30"):
                    variants = [b"\x01" + data]
                else:
                    variants = [data]
                for v in variants:
                    (d / hashlib.sha256(v).hexdigest()[:20]).write_bytes(v)
                    n += 1
        for old in (CRASHES / h).glob("crash-*"):  # earlier findings stay regression seeds
            if not old.name.endswith(".txt"):
                shutil.copyfile(old, d / old.name)
                n += 1
        counts[h] = n
    return counts


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STAT = re.compile(r"#(\d+)\s+\w+.*?corp: (\d+)/")


def summarize_crash(log: str) -> str:
    """The exception line and the innermost templatetool frame of an atheris crash report."""
    exc = ""
    m = re.search(r"=== Uncaught Python exception: ===\n(.*?)\n", log)
    if m:
        exc = m.group(1)
    frames = re.findall(r'File "([^"]*templatetool[^"]*)", line (\d+), in (\w+)', log)
    where = f"{Path(frames[-1][0]).relative_to(ROOT) if frames[-1][0].startswith(str(ROOT)) else frames[-1][0]}:" \
            f"{frames[-1][1]} {frames[-1][2]}" if frames else "?"
    if not exc:
        for key in ("Timeout", "out-of-memory", "deadly signal"):
            if key in log:
                exc = key
    return f"{exc} @ {where}"


def run_harness(h: str, workdir: Path, seconds: int, max_crashes: int) -> dict:
    corpus = workdir / "corpus" / h
    art_dir = workdir / "artifacts" / h
    art_dir.mkdir(parents=True, exist_ok=True)
    runs = 0
    crashes: list[dict] = []
    seen: set[str] = set()
    t_end = time.monotonic() + seconds
    started = time.monotonic()
    while True:
        left = int(t_end - time.monotonic())
        if left < 2 or len(crashes) >= max_crashes:
            break
        before = set(art_dir.iterdir())
        cp = subprocess.run([sys.executable, str(FUZZ / f"fuzz_{h}.py"), str(corpus), f"-max_total_time={left}",
                             "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1",
                             f"-artifact_prefix={art_dir}/"], capture_output=True, text=True, cwd=str(FUZZ))
        log = cp.stdout + cp.stderr
        m = _DONE.search(log)
        if m:
            runs += int(m.group(1))
        else:
            stats = _STAT.findall(log)
            if stats:
                runs += int(stats[-1][0])
        new = sorted(set(art_dir.iterdir()) - before)
        if cp.returncode != 0 and not new:  # the same crash again (artifact name exists): find it in the log
            m2 = re.search(r"Test unit written to (\S+)", log)
            if m2 and Path(m2.group(1)).exists():
                new = [Path(m2.group(1))]
        if cp.returncode == 0 or not new:
            if cp.returncode != 0 and not new:
                crashes.append({"summary": "harness error: " + log.strip().splitlines()[-1][:300] if log.strip() else "?",
                                "input": None})
            break
        summary = summarize_crash(log)
        bad = {f.read_bytes() for f in new}
        for c in corpus.iterdir():  # a crashing seed would stop every restart at the initial corpus read
            if c.read_bytes() in bad:
                c.unlink()
        for f in new:
            crashes.append({"summary": summary, "input": f.name, "size": f.stat().st_size})
            key = re.sub(r":.*? @", " @", summary, count=1)  # exception type + location, not its message
            if key not in seen:  # keep one regression input per distinct finding
                dst = CRASHES / h
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst / f.name)
                (dst / f"{f.name}.txt").write_text(summary + "\n")
            seen.add(key)
    elapsed = time.monotonic() - started
    return {"harness": h, "seconds": round(elapsed, 1), "runs": runs, "execs_per_s": round(runs / max(elapsed, 1e-9)),
            "corpus": len(list(corpus.iterdir())), "crashes": len(crashes),
            "distinct": sorted({c["summary"] for c in crashes})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", type=int, default=60, help="seconds per harness (default 60)")
    ap.add_argument("--only", default="", help="comma-separated harness names (default: all)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "templatetool-fuzz"))
    ap.add_argument("--max-crashes", type=int, default=5, help="stop a harness after this many crashes")
    ap.add_argument("--json", default=None, help="write the results table here")
    ap.add_argument("--no-seed", action="store_true", help="reuse WORKDIR/corpus as is")
    ap.add_argument("--ignore", default="", help="known finding classes to step over, e.g. multiline,RecursionError "
                    "(sets FUZZ_IGNORE for the harnesses)")
    a = ap.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("tools/fuzz.py: atheris is not installed (.venv/bin/pip install atheris)", file=sys.stderr)
        return 8
    names = [n for n in (a.only.split(",") if a.only else HARNESSES) if n]
    bad = [n for n in names if n not in HARNESSES]
    if bad:
        print(f"tools/fuzz.py: unknown harness(es) {bad}; known: {', '.join(HARNESSES)}", file=sys.stderr)
        return 2
    if a.ignore:
        os.environ["FUZZ_IGNORE"] = a.ignore
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not a.no_seed:
        counts = seed(work, names)
        print("seeds: " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)
    results = []
    for h in names:
        r = run_harness(h, work, a.time, a.max_crashes)
        results.append(r)
        print(f"{h:<18} {r['seconds']:>6.0f} s {r['runs']:>10} runs {r['execs_per_s']:>7}/s corpus {r['corpus']:>5} "
              f"crashes {r['crashes']}" + (f"  {r['distinct']}" if r["distinct"] else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
