"""Three `hgs serve` processes on 127.0.0.1 sharing one PostgreSQL (a private instance started here):
a host attests against any node, one node is killed mid-run, no request is lost (the client fails
over) and no key is released without an attestation (checked in the shared audit log)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .conftest import IN_CI, ROOT, require_module

httpx = require_module("httpx")
require_module("uvicorn")
require_module("sqlalchemy")
require_module("psycopg")

from cryptography.hazmat.primitives import serialization  # noqa: E402

from templatetool.errors import ResourceError  # noqa: E402
from templatetool.hgs import AttestationPolicy, attest, create_evidence, load_attestation, new_host  # noqa: E402
from templatetool.hgs.attest import health_fingerprint  # noqa: E402
from templatetool.hgs.client import HgsClient  # noqa: E402
from templatetool.hgs.host import pem_public  # noqa: E402
from templatetool.hgs.store import Store  # noqa: E402
from templatetool.hgs.wire import dump_roll_request  # noqa: E402
from templatetool.kp import create_kp  # noqa: E402

from .test_hgs_service import _fabric  # noqa: E402


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL on a free loopback port (as user nobody when we are root)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        msg = "needs PostgreSQL server binaries (Debian package postgresql: make deps)"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    d = Path(tempfile.mkdtemp(prefix="hgs-pg-"))
    os.chmod(d, 0o755)
    data = d / "data"
    run_as: list[str] = []
    user = os.environ.get("USER") or "postgres"
    if os.geteuid() == 0:
        run_as, user = ["runuser", "-u", "nobody", "--"], "nobody"
        shutil.chown(d, "nobody")
    port = _free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-l", str(d / "log"), "-w", "-t", "30", "-o",
                    f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _start_node(gdir: Path, db: str, name: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "templatetool.cli.main", "hgs", "serve", str(gdir), "--port", "0",
                          "--db", db, "--node", name], cwd=str(ROOT), stderr=subprocess.PIPE, text=True)
    return p, ""


def _url_of(p: subprocess.Popen) -> str:
    line = p.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    assert m, f"node did not start: {line}{p.stderr.read() if p.poll() is not None else ''}"
    return m.group(1)


def test_three_nodes_one_killed_no_request_lost(postgres, tmp_path: Path) -> None:
    gdir = _fabric(tmp_path)
    host = new_host("host-01", tmp_path / "host", key="ec-p256")
    pol = AttestationPolicy.load(gdir)
    pol.add_host_key("host-01", pem_public(host.host_key.public_key()))
    pol.save(gdir)
    from templatetool.guardian.model import generate_guardian, load_guardian

    secret = os.urandom(32)
    kp = create_kp(secret, generate_guardian("Owner", "ec-p256"), [load_guardian(gdir)])
    nodes = [_start_node(gdir, postgres, f"node{i}")[0] for i in range(3)]   # started together: schema race
    try:
        urls = [_url_of(p) for p in nodes]
        threads_n, per_thread = 3, 8
        rounds = threads_n * per_thread
        done: list[int] = []
        failovers: list[int] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def worker(w: int) -> None:
            live = [0, 1, 2]          # this client's rotation; an unreachable node is dropped from it
            mine = [HgsClient(u, timeout=10) for u in urls]

            def call(j: int, fn):
                k = live[j % len(live)]
                try:
                    return fn(mine[k])
                except ResourceError:
                    live.remove(k)
                    raise

            try:
                for i in range(w, w + per_thread):
                    for _attempt in range(3):
                        try:   # nonce from one node, attestation on the next, release on a third
                            nonce = call(i, lambda c: c.get_info()["Nonce"])
                            hc = call(i + 1, lambda c: c.attest_evidence(create_evidence(host, nonce=nonce)))
                            got = call(i + 2, lambda c: c.release(kp, host, hc))
                        except ResourceError:
                            with lock:
                                failovers.append(w)
                            continue
                        assert got == secret
                        with lock:
                            done.append(w)
                        break
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
            finally:
                for c in mine:
                    c.close()

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads_n)]
        for t in ts:
            t.start()
        while len(done) < rounds // 3 and any(t.is_alive() for t in ts):
            time.sleep(0.005)
        nodes[1].send_signal(signal.SIGKILL)   # a node dies while the clients are running
        nodes[1].wait(10)
        killed_at = len(done)
        for t in ts:
            t.join(120)
        assert not errors, errors
        assert killed_at < rounds, "the node was killed after the run"
        assert len(done) == rounds, f"{rounds - len(done)} request(s) lost"
        assert failovers, "no client ever reached the killed node"
        # any live node refuses a release with a health certificate no node issued
        key, cert = load_attestation(gdir)
        rogue_hc, _ = attest(pol, create_evidence(host), key, cert)
        r = httpx.post(urls[0] + "/KeyProtection/service/v1/rolltransportkey",
                       content=dump_roll_request(kp, rogue_hc.public_bytes(serialization.Encoding.DER)))
        assert r.status_code == 403 and b"HealthCertificateException" in r.content
    finally:
        for p in nodes:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
            p.stderr.close()
    # the shared audit log: every granted release follows a granted attestation of the same certificate
    st = Store(postgres)
    log = st.audit_log(10000)
    st.close()
    attested = set()
    released = 0
    for r in log:
        if r["event"] == "attest" and r["outcome"] == "granted":
            attested.add(r["health_certificate"])
        if r["event"] == "release" and r["outcome"] == "granted":
            assert r["health_certificate"] in attested, r
            released += 1
    assert released >= rounds   # a release whose reply died with the node is retried elsewhere
    assert health_fingerprint(rogue_hc) not in attested
    assert {r["node"] for r in log} >= {"node0", "node2"}
