#!/usr/bin/env python3
"""make bench: run every benchmark module in bench/ and print ratios against peer tools.

Each module ``bench/<x>_bench.py`` exposes ``run(size_mib: int, reps: int) -> dict`` returning
at least ``{"name": str, "rows": [{"what": str, "ours_s": float, "peer": str, "peer_s": float}]}``
(medians of ``reps`` runs, peers measured in the same run on the same data). Ratio printed =
peer time / our time (> 1 means we are faster).

    python bench/run.py [--size-mib 256] [--reps 3] [--only vhdx,bitlocker] [--json out.json]

A row with ``target`` (a minimum ratio) is printed with PASS/MISS, with the spread of the runs;
``checks`` entries (``value``, ``op`` "<=" or ">=", ``target``) likewise. ``make bench`` runs
``--only goals --size-mib 1024`` (issue 15's goal list, bench/goals_bench.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    only = {x for x in a.only.split(",") if x}
    results = []
    for mod_path in sorted(HERE.glob("*_bench.py")):
        key = mod_path.stem.removesuffix("_bench")
        if only and key not in only:
            continue
        spec = importlib.util.spec_from_file_location(mod_path.stem, mod_path)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(f"== {key} ({a.size_mib} MiB, {a.reps} reps)", flush=True)
        res = mod.run(a.size_mib, a.reps)
        results.append(res)
        for row in res.get("rows", []):
            ours, peer = row.get("ours_s"), row.get("peer_s")
            ratio = (peer / ours) if ours and peer else float("nan")
            mbps = row.get("bytes", a.size_mib << 20) / ours / 1e6 if ours else float("nan")
            if "target" in row:  # ratio = peer / ours, at least the target
                verdict = "PASS" if ratio >= row["target"] else "MISS"
                print(f"  {row['what']:<52} ours {ours:7.2f} s [{row.get('ours_spread', '')}]  "
                      f"{row.get('peer', '-')} {peer:7.2f} s [{row.get('peer_spread', '')}]  "
                      f"ratio {ratio:5.2f}x (reps {row.get('ratios', '')})  target >= {row['target']}x  {verdict}")
            else:
                print(f"  {row['what']:<48} ours {ours:8.3f} s ({mbps:7.1f} MB/s)  "
                      f"{row.get('peer', '-'):<34} {peer if peer else float('nan'):8.3f} s  ratio {ratio:5.2f}x")
        for c in res.get("checks", []):  # value compared with target by op ("<=" or ">=")
            v = c["value"]
            ok = (v <= c["target"]) if c["op"] == "<=" else (v >= c["target"])
            print(f"  {c['what']:<52} {v:7.2f} ({c.get('detail', '')})  target {c['op']} {c['target']}  "
                  f"{'PASS' if ok else 'MISS'}")
        for k, v in res.get("extra", {}).items():
            print(f"  {k}: {v}")
        if "rows" not in res:  # modules that return a flat dict of figures
            for k, v in res.items():
                print(f"  {k}: {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
