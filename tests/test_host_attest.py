"""`host attest`: a guarded host's health certificate from a live `hgs serve` (uvicorn on
127.0.0.1), cached in the host folder, reused while valid, refreshed inside the margin; key
release over the service with it."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest

from .conftest import assert_clean_error, require_module, run_cli

require_module("httpx")
require_module("uvicorn")
require_module("starlette")
require_module("sqlalchemy")

from templatetool.errors import CredentialError, FormatError, IntegrityError  # noqa: E402
from templatetool.guardian.model import generate_guardian, load_guardian  # noqa: E402
from templatetool.hgs import AttestationPolicy, new_host  # noqa: E402
from templatetool.hgs.host import pem_public  # noqa: E402
from templatetool.hgs.service import create_app, load_service_state  # noqa: E402
from templatetool.host.health import attest_host, cache_path, cached_health, parse_duration, release_secret  # noqa: E402
from templatetool.kp import create_kp  # noqa: E402

from .test_hgs_service import LiveServer, _fabric  # noqa: E402
from .test_hgs_tpm_quote import booted  # noqa: E402, F401 (fixture)
from .test_hgs_tpm_quote import fabric as tpmfab  # noqa: E402, F401 (fixture)


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hostattest")
    gdir = _fabric(root)
    host = new_host("host-01", root / "host", key="ec-p256")
    new_host("rogue", root / "rogue", key="ec-p256")
    pol = AttestationPolicy.load(gdir)
    pol.add_host_key("host-01", pem_public(host.host_key.public_key()))
    pol.save(gdir)
    owner = generate_guardian("Owner", "ec-p256")
    secret = os.urandom(32)
    kp = create_kp(secret, owner, [load_guardian(gdir)])
    kp_other = create_kp(os.urandom(32), owner, [generate_guardian("Other fabric", "ec-p256")])
    state = load_service_state(gdir, f"sqlite:///{root / 'state.sqlite'}", node="t")
    srv = LiveServer(create_app(state))
    yield {"root": root, "gdir": gdir, "db": f"sqlite:///{root / 'state.sqlite'}", "host": root / "host", "rogue": root / "rogue", "url": srv.url, "kp": kp,
           "kp_other": kp_other, "secret": secret}
    srv.stop()
    state.store.close()


def _attest(fab, *extra: str, host: str = "host"):
    return run_cli("host", "attest", "--hgs", fab["url"], "--host", str(fab[host]), "--json", *extra)


def test_attest_caches_and_refreshes(fab) -> None:
    cp = _attest(fab, "--force")
    assert cp.returncode == 0, cp.stderr
    first = json.loads(cp.stdout)["result"]
    assert first["cached"] is False and first["mode"] == "host-key"
    p = Path(first["cache"])
    assert p == cache_path(fab["host"], fab["url"]) and stat.S_IMODE(p.stat().st_mode) == 0o600
    again = json.loads(_attest(fab).stdout)["result"]
    assert again["cached"] is True and again["fingerprint"] == first["fingerprint"]
    # 8 h lifetime: a 9 h margin means "about to expire" -> attest again, new certificate
    fresh = json.loads(_attest(fab, "--refresh-margin", "9h").stdout)["result"]
    assert fresh["cached"] is False and fresh["fingerprint"] != first["fingerprint"]
    assert json.loads(_attest(fab).stdout)["result"]["fingerprint"] == fresh["fingerprint"]


def test_cache_expiry_and_foreign_certificate_not_reused(fab) -> None:
    st = attest_host(fab["url"], fab["host"])
    assert cached_health(fab["host"], fab["url"]) is not None
    later = st.valid_to - dt.timedelta(minutes=30)
    assert cached_health(fab["host"], fab["url"], at=later) is None  # inside the 1 h margin
    assert cached_health(fab["host"], fab["url"], at=later, margin=dt.timedelta(minutes=10)) is not None
    # another host's certificate copied into this host's cache is not this host's
    rogue_cache = cache_path(fab["rogue"], fab["url"])
    rogue_cache.parent.mkdir(exist_ok=True)
    rogue_cache.write_bytes(cache_path(fab["host"], fab["url"]).read_bytes())
    assert cached_health(fab["rogue"], fab["url"]) is None
    rogue_cache.write_bytes(b"{not json")
    assert cached_health(fab["rogue"], fab["url"]) is None


def test_unregistered_host_refused_exit_6(fab) -> None:
    cp = _attest(fab, host="rogue")
    assert_clean_error(cp, 6)
    assert json.loads(cp.stdout)["error"]["kind"] == "policy"
    assert not cache_path(fab["rogue"], fab["url"]).exists() or cached_health(fab["rogue"], fab["url"]) is None


def test_attest_usage_and_unreachable(fab, tmp_path: Path) -> None:
    assert_clean_error(_attest(fab, "--refresh-margin", "soon"), 2)
    assert_clean_error(_attest(fab, "--tcg-log", str(tmp_path / "x")), 2)  # --tcg-log without --tpm
    cp = run_cli("host", "attest", "--hgs", "http://127.0.0.1:9", "--host", str(fab["host"]), "--force")
    assert_clean_error(cp, 8)
    assert parse_duration("90s") == dt.timedelta(seconds=90) and parse_duration("2h") == dt.timedelta(hours=2)


def test_release_over_the_service(fab) -> None:
    st = attest_host(fab["url"], fab["host"])
    assert release_secret(fab["url"], fab["host"], fab["kp"], st) == fab["secret"]
    with pytest.raises(CredentialError):  # this fabric is not a guardian of the KP: InvalidWrappingException
        release_secret(fab["url"], fab["host"], fab["kp_other"], st)
    bad = bytearray(fab["kp"])
    i = bad.index(b"<", len(bad) // 2)
    bad[i + 1 : i + 2] = b"Q"
    with pytest.raises((IntegrityError, FormatError)):
        release_secret(fab["url"], fab["host"], bytes(bad), st)


def test_register_host_reaches_the_running_service(fab) -> None:
    """`hgs register-host --db` updates the live store: the host attests without a service restart."""
    late = fab["root"] / "late"
    assert run_cli("host", "new", "late", "-o", str(late)).returncode == 0
    assert_clean_error(run_cli("host", "attest", "--hgs", fab["url"], "--host", str(late)), 6)
    cp = run_cli("hgs", "register-host", str(fab["gdir"]), "--host", str(late), "--name", "late", "--db", fab["db"],
                 "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["store"].endswith("state.sqlite")
    cp = run_cli("host", "attest", "--hgs", fab["url"], "--host", str(late), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["cached"] is False


# -- host start: refusals before any VM runs ---------------------------------------------------

def _vm_secret(policy: str = "shielded", **extra) -> bytes:
    from templatetool.pipeline.shield import VmSecret

    return VmSecret(None, "00" * 34, "sha256", [7, 11], policy, {}, **extra).to_bytes()


def _start(fab, tmp: Path, secret: bytes, *extra: str, guardians=None):
    owner = generate_guardian("Owner", "ec-p256")
    kp = create_kp(secret, owner, guardians if guardians is not None else [load_guardian(fab["gdir"])])
    (tmp / "VM.kp").write_bytes(kp)
    (tmp / "VM.vhdx").write_bytes(b"\0" * 4096)
    (tmp / "VM.vtpm").write_bytes(b"state")
    return run_cli("host", "start", str(tmp / "VM.vhdx"), "--kp", str(tmp / "VM.kp"), "--hgs", fab["url"],
                   "--host", str(fab["host"]), "--json", *extra)


def test_host_start_refusals(fab, tmp_path: Path) -> None:
    # a VM secret without a vTPM state key (a software-vTPM VM): unsupported, exit 7
    cp = _start(fab, tmp_path, _vm_secret())
    assert_clean_error(cp, 7)
    # a KP whose secret is not a VM secret: exit 3
    assert_clean_error(_start(fab, tmp_path, os.urandom(32)), 3)
    # a KP this fabric is not a guardian of: no key, exit 5
    assert_clean_error(_start(fab, tmp_path, _vm_secret(), guardians=[generate_guardian("Other", "ec-p256")]), 5)
    # no vTPM state beside the disk: exit 9, before any network call
    (tmp_path / "VM.vtpm").unlink()
    cp = run_cli("host", "start", str(tmp_path / "VM.vhdx"), "--kp", str(tmp_path / "VM.kp"), "--hgs",
                 "http://127.0.0.1:9", "--host", str(fab["host"]))
    assert_clean_error(cp, 9)
    assert (tmp_path / "VM.vhdx").read_bytes() == b"\0" * 4096


def test_host_start_cli_boots_the_vm(fab, tmp_path: Path) -> None:
    """The whole CLI path (once VmSecret carries the vTPM state key): the console a shielded VM
    may not have is refused (exit 6), then the VM boots and its vTPM state is saved back."""
    from templatetool.tpm.vtpm_manufacture import manufacture_vtpm

    from .test_host_start import guest_pcr0, make_esp_vhdx

    v = manufacture_vtpm()
    disk = make_esp_vhdx(tmp_path)
    import hashlib

    secret = _vm_secret("shielded", vtpm_state_key=v.key, vtpm_state_sha256=hashlib.sha256(v.state).hexdigest())
    kp = create_kp(secret, generate_guardian("Owner", "ec-p256"), [load_guardian(fab["gdir"])])
    (tmp_path / "VM.kp").write_bytes(kp)
    (tmp_path / "VM.vtpm").write_bytes(v.state)
    base = ["host", "start", str(disk), "--kp", str(tmp_path / "VM.kp"), "--hgs", fab["url"], "--host",
            str(fab["host"]), "--memory", "256", "--cpus", "1", "--no-reboot", "--timeout", "240"]
    assert_clean_error(run_cli(*base, "--console", "serial"), 6)
    cp = run_cli(*base, "--serial-log", str(tmp_path / "serial.log"), "--json")
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)["result"]
    assert r["policy"] == "shielded" and r["vm"]["exit_code"] == 0 and r["vtpm_state_saved"] is True
    assert guest_pcr0((tmp_path / "serial.log").read_bytes()) != bytes(32)
    assert (tmp_path / "VM.vtpm").read_bytes() != v.state
    # the fabric's ledger took the new state (generation 1): the state shield wrote is now a rollback
    assert r["vtpm_state_generation"] == 1 and r["vtpm_state_report_error"] is None
    assert not (tmp_path / "VM.vtpm-report").exists()
    (tmp_path / "VM.vtpm").write_bytes(v.state)
    cp = run_cli(*base, "--serial-log", str(tmp_path / "serial2.log"))
    assert_clean_error(cp, 4)
    assert "older or forked" in cp.stderr and not (tmp_path / "serial2.log").exists()


def test_host_attest_tpm_mode_with_swtpm(tpmfab, tmp_path: Path) -> None:  # noqa: F811
    """`host attest --tpm`: a TPM quote by swtpm standing in for the host TPM; cached like host-key mode."""
    from .test_hgs_tpm_quote import _log

    log = tmp_path / "tcg.log"
    log.write_bytes(_log())
    th = tpmfab["tpm"]
    for h in (th.ak, th.ek):  # free the fixture's transient slots: the CLI loads its own EK and AK
        th.esys.flush_context(h)
    args = ["host", "attest", "--hgs", tpmfab["url"], "--host", str(tpmfab["host"].path), "--tpm",
            tpmfab["tpm"].tcti, "--tcg-log", str(log), "--json"]
    cp = run_cli(*args)
    assert cp.returncode == 0, cp.stderr
    r = json.loads(cp.stdout)["result"]
    assert r["mode"] == "tpm" and r["cached"] is False
    assert json.loads(run_cli(*args).stdout)["result"]["cached"] is True
    # host-key mode does not reuse a TPM-mode certificate (and this host has no host-key registration)
    assert_clean_error(run_cli(*args[:6]), 6)


def test_host_ek_writes_the_tpm_ek_for_registration(booted, tmp_path: Path) -> None:  # noqa: F811
    """`host ek`: the PEM it writes is the EK the TPM quote path registers and checks (same key as
    TpmHost.ek_pem, an RSA-2048 public key openssl reads); a TPM that is not there is one clean error."""
    import subprocess

    from cryptography.hazmat.primitives import serialization

    expected = booted.ek_pem()
    for h in (booted.ak, booted.ek):  # free the fixture's transient slots: the CLI creates its own
        booted.esys.flush_context(h)
    out = tmp_path / "ek.pem"
    cp = run_cli("host", "ek", "--tpm", booted.tcti, "-o", str(out), "--json")
    assert cp.returncode == 0, cp.stderr
    assert out.read_text() == expected
    key = serialization.load_pem_public_key(out.read_bytes())
    assert key.key_size == 2048  # type: ignore[union-attr]
    r = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(out), "-noout", "-text"], capture_output=True, text=True)
    assert r.returncode == 0 and "2048 bit" in r.stdout
    assert_clean_error(run_cli("host", "ek", "--tpm", booted.tcti, "-o", str(out)), 2)  # exists: needs --overwrite
    assert run_cli("host", "ek", "--tpm", booted.tcti, "-o", str(out), "--overwrite").returncode == 0
    assert_clean_error(run_cli("host", "ek", "--tpm", "swtpm:host=127.0.0.1,port=9", "-o", str(tmp_path / "x.pem")))
    assert not (tmp_path / "x.pem").exists()
