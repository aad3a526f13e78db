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
    yield {"root": root, "host": root / "host", "rogue": root / "rogue", "url": srv.url, "kp": kp,
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
