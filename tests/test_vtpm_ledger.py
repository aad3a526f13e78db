"""The fabric's vTPM state ledger (templatetool/hgs/ledger.py) over a live `hgs serve`: a release
must name the latest vTPM state of the VM, a stopped VM's new state is reported under a MAC by K,
an older copy of the state (a rollback) or a fork gets no key; `host start` resends a report an
interrupted run left behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from .conftest import assert_clean_error, require_module, require_tool, run_cli

require_module("httpx")
require_module("uvicorn")
require_module("sqlalchemy")

from cryptography.hazmat.primitives import serialization  # noqa: E402

from templatetool.errors import FormatError, IntegrityError, PolicyError  # noqa: E402
from templatetool.guardian.model import generate_guardian, load_guardian  # noqa: E402
from templatetool.hgs import AttestationPolicy, new_host  # noqa: E402
from templatetool.hgs.client import HgsClient  # noqa: E402
from templatetool.hgs.host import pem_public  # noqa: E402
from templatetool.hgs.ledger import state_mac, vm_id, vm_state_keys  # noqa: E402
from templatetool.hgs.service import create_app, load_service_state  # noqa: E402
from templatetool.hgs.wire import dump_roll_request  # noqa: E402
from templatetool.kp import create_kp  # noqa: E402

from .test_hgs_service import LiveServer, _fabric  # noqa: E402
from .test_host_start import fake_qemu  # noqa: E402, F401 (fixture)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _vm_secret(key: bytes, state: bytes) -> bytes:
    from templatetool.pipeline.shield import VmSecret

    return VmSecret(None, "00" * 34, "sha256", [7], "shielded", {}, vtpm_state_key=key,
                    vtpm_state_sha256=_sha(state)).to_bytes()


@pytest.fixture
def fab(tmp_path: Path):
    gdir = _fabric(tmp_path)
    host = new_host("host-01", tmp_path / "host", key="ec-p256")
    pol = AttestationPolicy.load(gdir)
    pol.add_host_key("host-01", pem_public(host.host_key.public_key()))
    pol.save(gdir)
    key, s0 = os.urandom(32), os.urandom(600)
    secret = _vm_secret(key, s0)
    owner = generate_guardian("Owner", "ec-p256")
    kp = create_kp(secret, owner, [load_guardian(gdir)])
    db = f"sqlite:///{tmp_path / 'state.sqlite'}"
    state = load_service_state(gdir, db)
    srv = LiveServer(create_app(state))
    c = HgsClient(srv.url)
    hc = c.attest(host)
    yield {"d": tmp_path, "gdir": gdir, "host": host, "hc": hc, "c": c, "kp": kp, "key": key, "s0": s0,
           "secret": secret, "owner": owner, "store": state.store, "url": srv.url, "db": db}
    c.close()
    srv.stop()
    state.store.close()


def _report(f, prev: str, cur: str, mac: str | None = None, kp: bytes | None = None):
    vid = vm_id(f["key"])
    return f["c"].report_vtpm_state(kp or f["kp"], f["hc"], prev, cur, mac or state_mac(f["key"], vid, prev, cur))


def test_vm_id_and_secret_fields(fab) -> None:
    vk = vm_state_keys(fab["secret"])
    assert vk is not None and vk.key == fab["key"] and vk.initial_sha256 == _sha(fab["s0"])
    assert vk.vm_id == vm_id(fab["key"]) and fab["key"].hex() not in vk.vm_id
    assert vm_state_keys(os.urandom(32)) is None  # not a VM secret: nothing to track
    assert vm_state_keys(b'{"format": "templatetool-vm-secret", "version": 2, "vtpm_state_key": null}') is None
    with pytest.raises(FormatError):
        vm_state_keys(b'{"format": "templatetool-vm-secret", "version": 2, "vtpm_state_key": "AAAA"}')


def test_release_must_name_the_latest_state(fab) -> None:
    c, h0 = fab["c"], _sha(fab["s0"])
    # a VM with a vTPM state: a release that names no state is a malformed request, no key
    with pytest.raises(FormatError, match="VtpmStateSha256"):
        c.release(fab["kp"], fab["host"], fab["hc"])
    with pytest.raises(IntegrityError, match="older or forked") as ei:
        c.release(fab["kp"], fab["host"], fab["hc"], _sha(b"some other state"))
    assert ei.value.code == "hgs.vtpm-state"
    assert c.release(fab["kp"], fab["host"], fab["hc"], h0) == fab["secret"]  # before any report: shield's state
    refused = [r for r in fab["store"].audit_log() if r["event"] == "release" and r["outcome"] == "refused"]
    assert len(refused) == 2 and "older or forked" in refused[-1]["detail"]


def test_report_advances_and_the_older_state_is_refused(fab) -> None:
    c, h0, h1, h2 = fab["c"], _sha(fab["s0"]), _sha(b"after boot 1"), _sha(b"after boot 2")
    vid, gen, cur = _report(fab, h0, h1)
    assert (vid, gen, cur) == (vm_id(fab["key"]), 1, h1)
    assert fab["store"].vm_state(vid) == (h1, 1)
    with pytest.raises(IntegrityError, match="generation 1"):  # the rollback: the state shield wrote
        c.release(fab["kp"], fab["host"], fab["hc"], h0)
    assert c.release(fab["kp"], fab["host"], fab["hc"], h1) == fab["secret"]
    assert _report(fab, h1, h2)[1] == 2
    # the same VM under another KP (kp grant makes new KP bytes around the same secret): same ledger
    kp2 = create_kp(fab["secret"], fab["owner"], [load_guardian(fab["gdir"])])
    assert kp2 != fab["kp"]
    with pytest.raises(IntegrityError):
        c.release(kp2, fab["host"], fab["hc"], h1)
    assert c.release(kp2, fab["host"], fab["hc"], h2) == fab["secret"]


def test_forks_replays_and_bad_macs_refused(fab) -> None:
    h0, h1, h2 = _sha(fab["s0"]), _sha(b"boot on host A"), _sha(b"boot on host B")
    with pytest.raises(IntegrityError, match="MAC"):
        _report(fab, h0, h1, mac=state_mac(os.urandom(32), vm_id(fab["key"]), h0, h1))
    with pytest.raises(IntegrityError, match="not the latest"):  # previous is not the latest (nor shield's)
        _report(fab, h1, h2)
    assert fab["store"].vm_state(vm_id(fab["key"])) is None
    assert _report(fab, h0, h1)[1] == 1
    assert _report(fab, h0, h1)[1] == 1  # a resent report is accepted unchanged
    with pytest.raises(IntegrityError, match="fork or a replay"):  # the other fork, from the same start
        _report(fab, h0, h2)
    assert fab["store"].vm_state(vm_id(fab["key"])) == (h1, 1)
    events = [(r["event"], r["outcome"]) for r in fab["store"].audit_log() if r["event"] == "vtpm-state"]
    assert events == [("vtpm-state", "refused"), ("vtpm-state", "refused"), ("vtpm-state", "granted"),
                      ("vtpm-state", "granted"), ("vtpm-state", "refused")]


def test_report_needs_a_health_certificate_of_this_fabric_and_a_vm_kp(fab, tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged health")])
    now = dt.datetime.now(dt.UTC)
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
              .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1)).sign(k, hashes.SHA256()))
    h0, h1 = _sha(fab["s0"]), _sha(b"x")
    mac = state_mac(fab["key"], vm_id(fab["key"]), h0, h1)
    with pytest.raises(PolicyError, match="not issued by this service"):
        fab["c"].report_vtpm_state(fab["kp"], forged, h0, h1, mac)
    plain_kp = create_kp(os.urandom(32), fab["owner"], [load_guardian(fab["gdir"])])
    with pytest.raises(FormatError, match="not a VM secret"):
        fab["c"].report_vtpm_state(plain_kp, fab["hc"], h0, h1, mac)
    # malformed digests are a request error, never a 500
    import httpx

    body = dump_roll_request(fab["kp"], fab["hc"].public_bytes(serialization.Encoding.DER), "zz" * 32)
    r = httpx.post(f"{fab['url']}/KeyProtection/service/v1/rolltransportkey", content=body,
                   headers={"content-type": "application/xml"})
    assert r.status_code == 400 and b"InvalidRequestException" in r.content
    r = httpx.post(f"{fab['url']}/KeyProtection/service/v1/vtpmstate", content=b"<x/>",
                   headers={"content-type": "application/xml"})
    assert r.status_code == 400 and b"InvalidRequestException" in r.content
    assert fab["store"].vm_state(vm_id(fab["key"])) is None


def test_schema_1_database_is_upgraded(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from templatetool.hgs.store import SCHEMA_VERSION, Store

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    s = Store(url)
    s.migrate()
    with s.engine.begin() as c:  # make it look like a version 1 database
        c.execute(sa.text("DROP TABLE vm_states"))
        c.execute(s.t["schema_version"].update().values(version=1))
    s.close()
    s = Store(url)
    assert s.migrate() == SCHEMA_VERSION == 2
    assert s.vm_state("00" * 32) is None
    assert s.advance_vm_state("00" * 32, "11" * 32, "22" * 32, "11" * 32, "h") == 1
    s.close()


# -- host start: the host side (a stand-in QEMU: the ledger logic, not the boot) -----------------

def test_host_start_resends_a_pending_report_and_refuses_a_rolled_back_state(
        tmp_path: Path, fake_qemu: str) -> None:
    require_tool("swtpm", "swtpm_setup")
    from templatetool.host.start import report_path_for, start_vm
    from templatetool.tpm.swtpm_state import decrypt_state, encrypt_state
    from templatetool.tpm.vtpm_manufacture import manufacture_vtpm

    v = manufacture_vtpm()
    s0 = v.state
    s1 = encrypt_state(decrypt_state(s0, v.key), v.key)  # another valid state under K (fresh IV)
    assert s1 != s0
    gdir = _fabric(tmp_path)
    host = new_host("host-01", tmp_path / "host", key="ec-p256")
    pol = AttestationPolicy.load(gdir)
    pol.add_host_key("host-01", pem_public(host.host_key.public_key()))
    pol.save(gdir)
    secret = _vm_secret(v.key, s0)
    kp = create_kp(secret, generate_guardian("Owner", "ec-p256"), [load_guardian(gdir)])
    state = load_service_state(gdir, f"sqlite:///{tmp_path / 'state.sqlite'}")
    srv = LiveServer(create_app(state))
    disk, sp = tmp_path / "VM.vhdx", tmp_path / "VM.vtpm"
    disk.write_bytes(b"\0" * 4096)
    vid, h0, h1 = vm_id(v.key), _sha(s0), _sha(s1)
    kw = {"qemu": fake_qemu, "accel": "tcg", "timeout": 60}
    try:
        # an interrupted run saved s1 and left its report: the next start sends it, then boots s1
        sp.write_bytes(s1)
        rp = report_path_for(sp)
        rp.write_text(json.dumps({"previous": h0, "current": h1, "mac": state_mac(v.key, vid, h0, h1)}))
        r = start_vm(disk, kp, srv.url, tmp_path / "host", **kw)
        assert r.run.exit_code == 0 and not rp.exists()
        assert state.store.vm_state(vid) == (h1, 1)
        # a report for a state that never got written (crash before the state file): dropped
        rp.write_text(json.dumps({"previous": h1, "current": "ab" * 32, "mac": "cd" * 32}))
        start_vm(disk, kp, srv.url, tmp_path / "host", **kw)
        assert not rp.exists() and state.store.vm_state(vid) == (h1, 1)
        # the rollback: somebody puts the state shield wrote back beside the disk
        sp.write_bytes(s0)
        with pytest.raises(IntegrityError, match="older or forked"):
            start_vm(disk, kp, srv.url, tmp_path / "host", **kw)
        (tmp_path / "VM.kp").write_bytes(kp)
        cp = run_cli("host", "start", str(disk), "--kp", str(tmp_path / "VM.kp"), "--hgs", srv.url, "--host",
                     str(tmp_path / "host"), "--accel", "tcg", "--timeout", "60")
        assert_clean_error(cp, 4)
        assert "older or forked" in cp.stderr
    finally:
        srv.stop()
        state.store.close()

