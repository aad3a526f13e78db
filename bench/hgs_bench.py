"""Bounded loopback load test of `hgs serve`: attestations and key releases per second, p50/p99.

One `hgs serve` process (SQLite state) on 127.0.0.1 and ``CLIENTS`` client threads, each doing
a fixed number of rounds (Getinfo nonce + hostkeyattest, then RollTransportKey + open the release).
Bounded by request count, loopback only. ``size_mib`` is ignored; ``reps`` scales the rounds.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 4
ROUNDS_PER_CLIENT = 25


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


def run(size_mib: int, reps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from templatetool.guardian.model import generate_guardian, load_guardian, save_guardian
    from templatetool.hgs import AttestationPolicy, init_attestation, new_host
    from templatetool.hgs.client import HgsClient
    from templatetool.hgs.host import pem_public
    from templatetool.kp import create_kp

    d = Path(tempfile.mkdtemp(prefix="hgs-bench-"))
    g = d / "fabric"
    save_guardian(generate_guardian("Bench HGS", "ec-p256"), g, None)
    init_attestation(g, "ec-p256")
    host = new_host("bench-host", d / "host", key="ec-p256")
    pol = AttestationPolicy.load(g)
    pol.add_host_key(host.name, pem_public(host.host_key.public_key()))
    pol.save(g)
    secret = os.urandom(32)
    kp = create_kp(secret, generate_guardian("Owner", "ec-p256"), [load_guardian(g)])
    p = subprocess.Popen([sys.executable, "-m", "templatetool.cli.main", "hgs", "serve", str(g), "--port", "0"],
                         cwd=str(ROOT), stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", p.stderr.readline())
        assert m, "hgs serve did not start"
        url = m.group(1)
        rounds = ROUNDS_PER_CLIENT * max(1, reps)
        att: list[float] = []
        rel: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            with HgsClient(url) as c:
                for _ in range(rounds):
                    try:
                        t0 = time.perf_counter()
                        hc = c.attest(host)
                        t1 = time.perf_counter()
                        assert c.release(kp, host, hc) == secret
                        t2 = time.perf_counter()
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        with lock:
                            errors.append(type(e).__name__)
                        continue
                    with lock:
                        att.append(t1 - t0)
                        rel.append(t2 - t1)

        t = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
    finally:
        p.terminate()
        p.wait(10)
        p.stderr.close()
    n = len(att)
    return {"name": "hgs", "clients": CLIENTS, "rounds": n, "errors": len(errors), "wall_s": round(wall, 2),
            "attest+release rounds/s": round(n / wall, 1),
            "attest p50/p99 ms": f"{_pct(att, 50):.1f} / {_pct(att, 99):.1f}",
            "release p50/p99 ms": f"{_pct(rel, 50):.1f} / {_pct(rel, 99):.1f}",
            "mean attest ms": round(statistics.mean(att) * 1000, 1), "mean release ms": round(statistics.mean(rel) * 1000, 1)}
