"""Resource limits: inputs that would need absurd memory or time get a clear refusal, in bounded memory.

Each command runs as a real subprocess; its peak RSS comes from ``os.wait4`` (the kernel's
rusage of that child) and must stay under RSS_LIMIT. Cases: a VHDX metadata item claiming 4 GiB,
a BAT larger than the file allows, a 2^62-byte virtual disk, a TCG log of 10^7 events (and one of
~2 million events just under the size limit), multi-GiB XML / PDK / evidence files (sparse), a
15 MiB key protector of a million elements, and shielding data with 10^6 (and 4 x 10^5) files.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import corpus_gen as cg
from .conftest import ROOT, assert_clean_error

RSS_LIMIT_MIB = 300
TIME_LIMIT_S = 30


_WRAPPER = r"""
import atexit, os, resource, runpy, sys
lim = int(os.environ.pop("TT_RLIMIT_AS"))
resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
out = os.environ.pop("TT_HWM_FILE")

def hwm():
    with open("/proc/self/status") as f:
        kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(str(kb))

atexit.register(hwm)
mode = sys.argv[1]
if mode == "-c":
    code = sys.argv[2]
    sys.argv = ["-c"] + sys.argv[3:]
    exec(compile(code, "<measured>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = ["templatetool"] + sys.argv[2:]
    from templatetool.cli.main import main
    main()
"""

#: address-space cap for measured children (a blow-up fails fast instead of swapping the box)
RLIMIT_AS = 3 << 30


def run_measured(*args: str, env: dict[str, str] | None = None, code: str | None = None,
                 timeout: float = TIME_LIMIT_S) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run the CLI (or ``code``) in a subprocess: (result, peak RSS in MiB, seconds).

    The peak RSS is the child's own VmHWM (read at exit; the pre-exec copy of the test process
    does not count); a child killed at ``timeout`` reports rc -9 and RSS inf."""
    import tempfile

    e = dict(os.environ)
    e.pop("TEMPLATETOOL_DEBUG", None)
    e.update(env or {})
    fd, hwm_file = tempfile.mkstemp(prefix="hwm-")
    os.close(fd)
    e["TT_HWM_FILE"], e["TT_RLIMIT_AS"] = hwm_file, str(RLIMIT_AS)
    cmd = [sys.executable, "-c", _WRAPPER] + (["-c", code] if code else ["cli", *args])
    t0 = time.monotonic()
    try:
        cp = subprocess.run(cmd, cwd=str(ROOT), env=e, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as te:
        cp = subprocess.CompletedProcess(cmd, -9, te.stdout or "", f"killed after {timeout} s")
    dt = time.monotonic() - t0
    try:
        rss = int(Path(hwm_file).read_text() or "0") / 1024 or float("inf")
    except (OSError, ValueError):
        rss = float("inf")
    finally:
        os.unlink(hwm_file)
    return cp, rss, dt


def refused(cp: subprocess.CompletedProcess[str], rss: float, dt: float, what: str) -> None:
    assert_clean_error(cp)
    assert rss < RSS_LIMIT_MIB, f"{what}: peak RSS {rss:.0f} MiB"
    assert dt < TIME_LIMIT_S, f"{what}: took {dt:.0f} s"


def bounded(cp: subprocess.CompletedProcess[str], rss: float, dt: float, what: str) -> None:
    """Either a clean refusal or success — in bounded memory and time."""
    if cp.returncode != 0:
        assert_clean_error(cp)
    assert rss < RSS_LIMIT_MIB, f"{what}: peak RSS {rss:.0f} MiB (rc {cp.returncode})"
    assert dt < TIME_LIMIT_S, f"{what}: took {dt:.0f} s"


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> cg.Artifacts:
    return cg.session_artifacts(tmp_path_factory)


def _case_data(art: cg.Artifacts, case_id: str) -> bytes:
    return next(c for c in cg.vhdx_cases(art) if c.id == case_id).files["in.vhdx"]


@pytest.mark.parametrize("case_id, cmd", [("vhdx-meta-item-len-4g", "check"), ("vhdx-rt-bat-len-4g", "check"),
                                          ("vhdx-disk-size-huge", "inspect"), ("vhdx-disk-size-huge", "convert"),
                                          ("vhdx-rt-bat-len-4g", "convert"), ("vhdx-meta-item-len-4g", "inspect")])
def test_vhdx_absurd_sizes(art: cg.Artifacts, tmp_path: Path, case_id: str, cmd: str) -> None:
    p = tmp_path / "in.vhdx"
    p.write_bytes(_case_data(art, case_id))
    argv = {"check": ["vhdx", "check", str(p)], "inspect": ["inspect", str(p)],
            "convert": ["vhdx", "convert", str(p), str(tmp_path / "out.raw")]}[cmd]
    refused(*run_measured(*argv), what=f"{case_id} {cmd}")
    assert not (tmp_path / "out.raw").exists()


def _sha1_events(n: int) -> bytes:
    """n legacy (SHA-1 format) events of 32 bytes each: PCR 0, EV_POST_CODE, a non-zero digest, no data."""
    return struct.pack("<II", 0, 1) + b"\x11" * 20 + struct.pack("<I", 0)


def _write_log(path: Path, events: int) -> None:
    ev = _sha1_events(1)
    per = (1 << 20) // len(ev)
    chunk = ev * per
    with open(path, "wb") as f:
        left = events
        while left >= per:
            f.write(chunk)
            left -= per
        f.write(ev * left)


def test_tcg_log_ten_million_events(tmp_path: Path) -> None:
    p = tmp_path / "big.log"
    _write_log(p, 10_000_000)
    assert p.stat().st_size == 320_000_000
    refused(*run_measured("tpm", "pcrs", str(p)), what="10^7-event TCG log")


def test_tcg_log_linear_time(tmp_path: Path) -> None:
    """20,000 events (640 KB) replay in under 3 s (a linear parser needs well under a second)."""
    p = tmp_path / "big.log"
    _write_log(p, 20_000)
    cp, rss, dt = run_measured("tpm", "pcrs", str(p), timeout=3)
    assert cp.returncode == 0, cp.stderr[-300:]
    bounded(cp, rss, dt, "20k-event TCG log")


@pytest.mark.slow
def test_tcg_log_just_under_size_limit(tmp_path: Path) -> None:
    """~2 million events in just under 64 MiB (the parser's file limit): refused or replayed in bounded memory."""
    from templatetool.tpm.eventlog import MAX_LOG

    p = tmp_path / "big.log"
    _write_log(p, (MAX_LOG - 4096) // 32)
    bounded(*run_measured("tpm", "pcrs", str(p), timeout=120), what="2M-event TCG log")


@pytest.mark.parametrize("argv, name", [
    (["kp", "show", "{f}"], "vm.kp"),
    (["guardian", "import", "{f}", "-o", "{d}/g", "--allow-untrusted-root"], "g.xml"),
    (["guardian", "show", "{f}"], "g.xml"),
    (["pdk", "verify", "{f}"], "t.pdk"),
    (["vsc", "show", "{f}"], "t.vsc"),
    (["tpm", "pcrs", "{f}"], "huge.log"),
    (["tpm", "show", "{f}"], "blob.bin"),
    (["tpm", "parent", "{f}"], "parent.pub"),
    pytest.param(["hgs", "attest", "{demo}/fabric", "{f}", "-o", "{d}/hc.pem"], "ev.json"),
    pytest.param(["build", "{f}"], "recipe.toml"),
    pytest.param(["decrypt", "{art}/bl.img", "-o", "{d}/o.img", "--startup-key", "{f}"], "key.bek"),
    pytest.param(["decrypt", "{art}/bl.img", "-o", "{d}/o.img", "--recovery-password-file", "{f}"], "rp.txt"),
])
def test_multi_gib_small_inputs_refused(art: cg.Artifacts, tmp_path: Path, argv: list[str], name: str) -> None:
    """A 4 GiB (sparse) file where a small input belongs: refused without reading it all."""
    f = tmp_path / name
    with open(f, "wb") as fh:
        fh.write(b"<?xml version='1.0'?>" if name.endswith((".kp", ".xml")) else b"{")
        fh.truncate(4 << 30)
    args = [a.format(f=f, d=tmp_path, demo=art.demo, art=art.dir) for a in argv]
    refused(*run_measured(*args), what=f"4 GiB {name}")
    assert not [p for p in tmp_path.iterdir() if p.name not in (name,)]


def test_kp_million_elements(art: cg.Artifacts, tmp_path: Path) -> None:
    """A 15 MiB key protector stuffed with a million elements: clean refusal in bounded memory."""
    xml = art["vm.kp"].read_bytes()
    i = xml.index(b"</", len(xml) - 40)
    stuffed = xml[:i] + b"<x/>" * 1_000_000 + xml[i:]
    assert len(stuffed) < 16 << 20
    (tmp_path / "vm.kp").write_bytes(stuffed)
    refused(*run_measured("kp", "show", str(tmp_path / "vm.kp")), what="1M-element KP")


_PDK_CODE = r"""
import sys, time
from pathlib import Path
from templatetool.guardian.model import load_guardian
from templatetool.pdk.document import NamedFile, SecretPart
from templatetool.pdk.shielding import create_pdk
from templatetool.errors import TemplateToolError
demo, n, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
owner = load_guardian(demo / "owner", private=True)
fabric = load_guardian(demo / "fabric")
files = [NamedFile(f"f{i}", b"") for i in range(n)]
try:
    pdk, _ = create_pdk(owner, [fabric], [], SecretPart(other_files=files), "shielded", allow_untrusted_root=True)
except TemplateToolError as e:
    print("REFUSED", type(e).__name__, e)
    sys.exit(e.exit_code)
Path(out).write_bytes(pdk)
print("CREATED", len(pdk))
"""


def _make_pdk(art: cg.Artifacts, n: int, out: Path) -> tuple[subprocess.CompletedProcess[str], float, float]:
    code = _PDK_CODE.replace("sys.argv[1]", repr(str(art.demo))).replace("int(sys.argv[2])", str(n)) \
        .replace("sys.argv[3]", repr(str(out)))
    return run_measured(code=code)


def test_pdk_million_files_refused_at_creation(art: cg.Artifacts, tmp_path: Path) -> None:
    cp, rss, dt = _make_pdk(art, 1_000_000, tmp_path / "m.pdk")
    assert cp.returncode != 0 and "REFUSED" in cp.stdout, cp.stdout + cp.stderr[-500:]


def test_pdk_many_files_read_bounded(art: cg.Artifacts, tmp_path: Path) -> None:
    """A PDK with 4 x 10^5 files (just under the PDK size limit): opened or refused in bounded memory."""
    cp, rss, dt = _make_pdk(art, 400_000, tmp_path / "m.pdk")
    if cp.returncode != 0:  # refused at creation: the limit exists
        assert "REFUSED" in cp.stdout, cp.stderr[-800:]
        return
    assert (tmp_path / "m.pdk").stat().st_size < 16 << 20
    cp2, rss2, dt2 = run_measured("pdk", "show", str(tmp_path / "m.pdk"), "--key", str(art.demo / "owner"), "--json")
    bounded(cp2, rss2, dt2, "PDK with 4e5 files: show")
    cp3, rss3, dt3 = run_measured("pdk", "show", str(tmp_path / "m.pdk"), "--key", str(art.demo / "owner"), "--extract",
                                  str(tmp_path / "x"))
    bounded(cp3, rss3, dt3, "PDK with 4e5 files: extract")
    if cp3.returncode != 0:
        assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
