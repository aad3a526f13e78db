"""Atomic outputs under fault injection (copy mode): `encrypt`, `protect` and `shield`.

Part 1 — SIGKILL at seeded, event-driven points: each command runs as a real subprocess
(``python -m tests.killpoints``, i.e. the CLI plus a hand-shake: it stops at every progress step
of a disk pass and before every rename of an output into place, and waits for the test's answer).
A calibration run lists the command's events; each kill point is a seeded event index, and the
test SIGKILLs the process while it waits there — so every planned kill lands, at the same point,
however loaded the machine (no wall clock, no polling of file sizes). After each kill: the inputs are byte-identical (sha256 before/after); every
destination is absent or complete and valid (the encrypted disk unlocks and decrypts to the
template's volume, the template verifies against its catalog, the shielded VM passes the
guardian dry run); nothing but the documented temp patterns is left (``.NAME.*.tmp``,
``.NAME.partial.*``, ``.tt-overlay-*.raw``, protect's ``.tt-protect-*`` staging folder) and never at a destination name. Then the same
command, re-run, succeeds. 12 kill points in CI, 54 behind ``slow``.

Part 2 — deterministic kill points between the steps that write several outputs (in a forked
CLI child where the step function is replaced by an immediate SIGKILL or an I/O error).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import corpus_gen as cg
from .conftest import GOLDEN, ROOT

TEMP_PATTERNS = [re.compile(r"^\..+\.tmp$"), re.compile(r"^\..+\.partial(\..*)?$"),
                 re.compile(r"^\.tt-overlay-.*\.raw$"), re.compile(r"^\.tt-protect-\w+$")]  # metadata overlay; protect scratch
SEED = 9001
#: tallies for docs/reliability.md (printed with -s)
STATS = {"killed": 0, "finished_before_kill": 0, "temp_left": 0, "orphans": 0}


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def tree_sha(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: sha(path)}
    return {str(p.relative_to(path)): sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> cg.Artifacts:
    return cg.session_artifacts(tmp_path_factory)


class Job:
    """One command: its inputs (copied into the work folder), argv, outputs and validator."""

    def __init__(self, name: str, work: Path, inputs: dict[str, Path], argv: list[str], outputs: list[str],
                 validate, env: dict[str, str] | None = None) -> None:
        self.name, self.work, self.argv, self.outputs, self.validate = name, work, argv, outputs, validate
        self.env = env or {}
        work.mkdir(parents=True, exist_ok=True)
        for n, src in inputs.items():
            if src.is_dir():
                shutil.copytree(src, work / n)
            else:
                shutil.copyfile(src, work / n)
        self.inputs = {n: tree_sha(work / n) for n in inputs}
        self.expected_names = set(inputs) | set(outputs)

    def args(self) -> list[str]:
        return [a.format(w=self.work) for a in self.argv]

    def reset(self) -> None:
        for p in self.work.iterdir():
            if p.name not in self.inputs:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def start(job: Job, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None,
          module: str = "templatetool.cli.main") -> subprocess.Popen:
    e = dict(os.environ)
    e.pop("TEMPLATETOOL_DEBUG", None)
    e.update(job.env)
    e.update(env or {})
    # stderr to a file, not a pipe: a helper process that outlives a killed CLI must not block us
    job.errlog = open(job.work.parent / f"{job.name}.stderr", "w+b")
    return subprocess.Popen([sys.executable, "-m", module, "-q", *job.args()], cwd=str(ROOT), env=e,
                            stdout=subprocess.DEVNULL, stderr=job.errlog, pass_fds=pass_fds)


def lingering(job: Job, grace: float = 3.0) -> list[int]:
    """PIDs of processes still running on this job's files ``grace`` s after the CLI died."""
    deadline = time.monotonic() + grace
    while True:
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(job.work).encode() in cmd and state != "Z":
                pids.append(int(d))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def reap(job: Job) -> None:
    """Kill (by PID) processes this job left running; count them."""
    pids = lingering(job)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    STATS["orphans"] = STATS.get("orphans", 0) + len(pids)


#: A run that shows no event for this long is hung (generous: only a stuck run waits this long).
EVENT_TIMEOUT = 300.0


def run_and_kill(job: Job, kill_at: int | None) -> tuple[bool, list[str]]:
    """Run ``job`` under tests.killpoints; SIGKILL it while it waits at event ``kill_at`` (1-based).

    Returns (killed, the events seen). The CLI blocks at each event until we answer, so the kill
    lands exactly there, however loaded the machine is.
    """
    from .killpoints import ENV

    ev_r, ev_w = os.pipe()
    ack_r, ack_w = os.pipe()
    try:
        p = start(job, pass_fds=(ev_w, ack_r), env={ENV: f"{ev_w},{ack_r}"}, module="tests.killpoints")
    finally:
        os.close(ev_w)
        os.close(ack_r)
    events: list[str] = []
    killed, buf = False, b""
    last = time.monotonic()
    try:
        while not killed:
            ready, _, _ = select.select([ev_r], [], [], 0.2)
            if not ready:
                if p.poll() is not None:
                    break
                assert time.monotonic() - last < EVENT_TIMEOUT, f"{job.name}: no event for {EVENT_TIMEOUT} s"
                continue
            chunk = os.read(ev_r, 4096)
            if not chunk:
                break
            buf += chunk
            last = time.monotonic()
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                events.append(line.decode())
                if len(events) == kill_at:
                    p.send_signal(signal.SIGKILL)  # the CLI is waiting for our answer: it dies right here
                    killed = True
                    break
                os.write(ack_w, b"g")
    finally:
        os.close(ev_r)
        os.close(ack_w)
    p.wait()
    job.errlog.seek(0)
    err = job.errlog.read()
    job.errlog.close()
    if killed:
        assert p.returncode == -signal.SIGKILL, (p.returncode, err.decode()[-2000:])
        STATS["killed"] += 1
        reap(job)
        return True, events
    assert p.returncode == 0, f"{job.name} failed without being killed: {err.decode()[-2000:]}"
    STATS["finished_before_kill"] += 1
    return False, events


def check_after(job: Job, art: cg.Artifacts, killed_note: str) -> list[str]:
    """Inputs identical, outputs absent or valid, only temp patterns left; returns leftover temp names."""
    for n, h in job.inputs.items():
        assert tree_sha(job.work / n) == h, f"{job.name} {killed_note}: input {n} changed"
    leftovers = []
    for p in job.work.iterdir():
        if p.name in job.expected_names:
            continue
        assert any(t.match(p.name) for t in TEMP_PATTERNS), f"{job.name} {killed_note}: stray file {p.name}"
        leftovers.append(p.name)
    present = [o for o in job.outputs if (job.work / o).exists()]
    if present:
        job.validate(job, art, present, killed_note)
    return leftovers


# ---- validators ---------------------------------------------------------------------------

def _decrypts_to_template(enc: Path, bek: bytes, template: Path) -> bool:
    """The encrypted disk's volume, unlocked with ``bek``, equals the template's OS volume.

    Excluded on both sides: BitLocker's own regions (readers show zeros / the relocated header)
    and spans the encryption left unallocated in the output because they are free in NTFS and
    unallocated in the source (used-space-only: readers return garbage there by design)."""
    from templatetool.bitlocker.volume import open_fve
    from templatetool.disk import open_disk, select_volume

    with open_disk(enc) as dev, open_disk(template) as tdev:
        view, _ = select_volume(dev, None)
        fve = open_fve(view)
        plain = fve.unlock(bek=bek)
        tview, _ = select_volume(tdev, None)
        if tview.size != plain.size:
            return False
        holes, pos = [], 0
        for o, n in view.allocated_ranges():
            if o > pos:
                holes.append((pos, o - pos))
            pos = o + n
        if pos < view.size:
            holes.append((pos, view.size - pos))
        masked = fve.regions().spans() + holes
        for pos in range(0, plain.size, 1 << 20):
            n = min(1 << 20, plain.size - pos)
            a, b = bytearray(plain.read(pos, n)), bytearray(tview.read(pos, n))
            for o, k in masked:
                lo, hi = max(o, pos), min(o + k, pos + n)
                if lo < hi:
                    a[lo - pos:hi - pos] = bytes(hi - lo)
                    b[lo - pos:hi - pos] = bytes(hi - lo)
            if a != b:
                return False
    return True


def validate_encrypt(job: Job, art: cg.Artifacts, present: list[str], note: str) -> None:
    if "enc.vhdx" not in present:
        # killed between the key files and the disk (keys are saved first, B2): each key file
        # present is complete on its own; the disk that would need them does not exist
        from templatetool.bitlocker.keys import parse_bek

        if "rp.txt" in present:
            assert re.fullmatch(r"\d{6}(-\d{6}){7}", (job.work / "rp.txt").read_text().strip()), note
        if "sk.bek" in present:
            parse_bek((job.work / "sk.bek").read_bytes(), "sk.bek")
        return
    assert "sk.bek" in present and "rp.txt" in present, \
        f"encrypt {note}: the encrypted disk exists but its key files do not ({present})"
    bek = (job.work / "sk.bek").read_bytes()
    assert _decrypts_to_template(job.work / "enc.vhdx", bek, job.work / "template.vhdx"), \
        f"encrypt {note}: decrypts differently"


def validate_protect(job: Job, art: cg.Artifacts, present: list[str], note: str) -> None:
    from templatetool.catalog.vsc import verify_template

    rep = verify_template(job.work / "t.vhdx")
    assert rep.ok, f"protect {note}: the template does not verify"


def validate_shield(job: Job, art: cg.Artifacts, present: list[str], note: str) -> None:
    from templatetool.pipeline.unlock import unlock

    if "vm.vhdx" not in present:
        return  # vm.kp / escrow without the disk: complete files on their own (documented)
    assert {"vm.kp", "vm.recovery.p7m", "vm.vtpm"} <= set(present), \
        f"shield {note}: disk without KP/escrow/vTPM state ({present})"
    rep = unlock(job.work / "vm.vhdx", job.work / "vm.kp", art.demo / "fabric", art.demo / "host", dry_run=True)
    assert rep.ok, f"shield {note}: dry run fails: {rep.to_json()}"


def make_jobs(art: cg.Artifacts, base: Path) -> dict[str, Job]:
    d = art.demo
    enc = Job("encrypt", base / "encrypt", {"template.vhdx": d / "template.vhdx"},
              ["encrypt", "{w}/template.vhdx", "-o", "{w}/enc.vhdx", "--recovery-password-out", "{w}/rp.txt",
               "--startup-key-out", "{w}/sk.bek"], ["enc.vhdx", "rp.txt", "sk.bek"], validate_encrypt)
    prot = Job("protect", base / "protect", {"golden.vhdx": GOLDEN, "signer.key.pem": d / "signer.key.pem",
                                             "signer.pem": d / "signer.pem"},
               ["protect", "{w}/golden.vhdx", "-o", "{w}/t.vhdx", "--name", "WindowsServer2025-Datacenter", "--version",
                "10.0.26100.1", "--signer", "pem:{w}/signer.key.pem,{w}/signer.pem"], ["t.vhdx"], validate_protect)
    sh = Job("shield", base / "shield", {"template.vhdx": d / "template.vhdx", "tenant.pdk": d / "tenant.pdk",
                                         "owner": d / "owner", "fabric": d / "fabric",
                                         "ref.tcglog": d / "vm-reference.tcglog"},
             ["shield", "{w}/template.vhdx", "--pdk", "{w}/tenant.pdk", "--owner", "{w}/owner", "--guardian",
              "{w}/fabric", "-o", "{w}/vm.vhdx", "--tcg-log", "{w}/ref.tcglog"],
             ["vm.vhdx", "vm.kp", "vm.recovery.p7m", "vm.vtpm"], validate_shield)
    return {"encrypt": enc, "protect": prot, "shield": sh}


def _campaign(art: cg.Artifacts, base: Path, plan: list[tuple[str, str]], seed: int) -> dict:
    """Kill each planned command at a seeded event: ``data`` = a progress step of a disk pass,
    ``rename`` = just before an output (or the disk's ``.partial``) is renamed into place."""
    jobs = make_jobs(art, base)
    r = random.Random(seed)
    calibrated: dict[str, list[str]] = {}
    leftovers_seen: dict[str, set[str]] = {}
    for name, how in plan:
        job = jobs[name]
        if name not in calibrated:  # a full run: the events this command goes through
            job.reset()
            killed, events = run_and_kill(job, None)
            assert not killed and events, f"{name}: no kill-point events"
            calibrated[name] = events
            check_after(job, art, "complete run")
            job.reset()
        events = calibrated[name]
        points = [i + 1 for i, e in enumerate(events) if e.startswith("progress" if how == "data" else "rename")]
        assert points, f"{name}: no {how} events in {events[:5]}..."
        k = r.choice(points)
        note = f"killed at event {k}/{len(events)} ({events[k - 1]})"
        killed, seen = run_and_kill(job, k)
        assert killed and seen[-1] == events[k - 1], f"{name}: {note}, but the run showed {seen[-3:]}"
        left = check_after(job, art, note)
        leftovers_seen.setdefault(name, set()).update(left)
        STATS["temp_left"] += len(left)
        # re-running the command after the crash completes the job
        for o in job.outputs:
            if (job.work / o).exists():
                (job.work / o).unlink()
        assert run_and_kill(job, None)[0] is False
        check_after(job, art, f"re-run after {note}")
        job.reset()
    return {k: sorted(v) for k, v in leftovers_seen.items()}


def test_sigkill_ci(art: cg.Artifacts, tmp_path: Path) -> None:
    """12 kill points, 4 per command: 2 inside a disk pass, 2 just before an output is renamed in."""
    before = STATS["killed"]
    plan = [(c, h) for c in ("encrypt", "protect", "shield") for h in ("data", "rename", "data", "rename")]
    left = _campaign(art, tmp_path, plan, SEED)
    print(f"\nSIGKILL CI: {STATS}; temp files seen after kills: {left}")
    assert STATS["killed"] - before == len(plan), STATS


@pytest.mark.slow
def test_sigkill_full(art: cg.Artifacts, tmp_path: Path) -> None:
    """54 kill points (18 per command)."""
    before = STATS["killed"]
    plan = [(c, h) for c in ("encrypt", "protect", "shield") for h in ("data", "rename") * 9]
    left = _campaign(art, tmp_path, plan, SEED + 1)
    print(f"\nSIGKILL full: {STATS}; temp files seen after kills: {left}")
    assert STATS["killed"] - before == len(plan), STATS


# ---- Part 2: deterministic kill points between outputs ---------------------------------------

def _die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)


def _enospc(*a, **k):
    raise OSError(28, "No space left on device")


@pytest.fixture
def enc_job(art: cg.Artifacts, tmp_path: Path) -> Job:
    cg.preload_cli()
    return make_jobs(art, tmp_path)["encrypt"]


def test_encrypt_killed_before_key_files(enc_job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    import templatetool.cli.bitlocker_cmd as bc

    monkeypatch.setattr(bc, "write_secret_file", _die)
    cp = cg.fork_cli(*enc_job.args())
    assert cp.returncode == -signal.SIGKILL
    assert not (enc_job.work / "enc.vhdx").exists() or (enc_job.work / "sk.bek").exists()


def test_encrypt_enospc_on_key_file(enc_job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    import templatetool.cli.bitlocker_cmd as bc

    from .conftest import assert_clean_error

    monkeypatch.setattr(bc, "write_secret_file", _enospc)
    cp = cg.fork_cli(*enc_job.args())
    assert_clean_error(cp, 8)
    assert not (enc_job.work / "enc.vhdx").exists()


@pytest.mark.parametrize("point", ["escrow", "kp", "rename"])
def test_shield_killed_between_outputs(point: str, art: cg.Artifacts, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill shield after the escrow, after the KP, or at the final rename: never a disk without its KP and
    escrow; the inputs unchanged; a re-run succeeds."""
    import templatetool.atomic as at

    cg.preload_cli()
    job = make_jobs(art, tmp_path)["shield"]
    # the outputs are committed together (atomic.OutputSet): die once the escrow / the KP is in
    # place, or at the disk's rename (the last one)
    real_replace = os.replace

    def rep(a, b, *x, **k):
        name = Path(b).name
        if point == "rename" and name == "vm.vhdx":
            _die()
        real_replace(a, b, *x, **k)
        if point == "escrow" and name == "vm.recovery.p7m" or point == "kp" and name == "vm.kp":
            _die()

    monkeypatch.setattr(at.os, "replace", rep)
    cp = cg.fork_cli(*job.args())
    monkeypatch.undo()
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    left = check_after(job, art, f"killed at {point}")
    assert not (job.work / "vm.vhdx").exists()
    for o in job.outputs:
        if (job.work / o).exists():
            (job.work / o).unlink()
    cp = cg.fork_cli(*job.args())
    assert cp.returncode == 0, cp.stderr
    check_after(job, art, f"re-run after kill at {point}")
    print(f"\nshield killed at {point}: left {left}")


def test_no_process_left_after_sigkill(art: cg.Artifacts, tmp_path: Path) -> None:
    job = make_jobs(art, tmp_path)["encrypt"]
    p = start(job)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 30:
        kids = [d for d in os.listdir("/proc") if d.isdigit() and _ppid(d) == p.pid]
        if kids:  # the key-stretch helper is up: crash the CLI now
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    job.errlog.close()
    left = lingering(job, grace=5.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes still running 5 s after the CLI was killed: {left}"


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
