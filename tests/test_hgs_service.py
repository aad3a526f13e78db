"""`hgs serve`: the HGS over HTTP (real uvicorn on 127.0.0.1): attestation with a server nonce, key
release by RollTransportKey, the documented error replies for bad input, the audit log."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import GOLDEN, ROOT, assert_clean_error, require_module, run_cli

httpx = require_module("httpx")
require_module("uvicorn")
require_module("starlette")
require_module("sqlalchemy")

from cryptography.hazmat.primitives import serialization  # noqa: E402

from templatetool.errors import CredentialError, IntegrityError, PolicyError  # noqa: E402
from templatetool.guardian.model import generate_guardian, save_guardian  # noqa: E402
from templatetool.hgs import AttestationPolicy, attest, create_evidence, init_attestation, load_host, new_host  # noqa: E402
from templatetool.hgs.attest import health_fingerprint, verify_health_certificate  # noqa: E402
from templatetool.hgs.client import HgsClient  # noqa: E402
from templatetool.hgs.host import pem_public  # noqa: E402
from templatetool.hgs.service import create_app, load_service_state  # noqa: E402
from templatetool.hgs.wire import dump_roll_request, dump_wcf, wcf_type  # noqa: E402
from templatetool.kp import create_kp  # noqa: E402

ROLL = "/KeyProtection/service/v1/rolltransportkey"
ATTEST = "/Attestation/v2.0/hostkeyattest"


class LiveServer:
    """uvicorn serving an app on an ephemeral 127.0.0.1 port in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        from templatetool.cli.hgs_serve_cmd import bind_socket

        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t < 10, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _fabric(root: Path, name: str = "Fabric HGS") -> Path:
    d = root / "fabric"
    save_guardian(generate_guardian(name, "ec-p256"), d, None)
    init_attestation(d, "ec-p256")
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hgssvc")
    fabric = _fabric(root)
    host = new_host("host-01", root / "host", key="ec-p256")
    rogue = new_host("rogue", root / "rogue", key="ec-p256")
    pol = AttestationPolicy.load(fabric)
    pol.add_host_key("host-01", pem_public(host.host_key.public_key()))
    pol.save(fabric)
    from templatetool.guardian.model import load_guardian

    owner = generate_guardian("Owner", "ec-p256")
    fab = load_guardian(fabric)
    secret = os.urandom(48)
    kp = create_kp(secret, owner, [fab])
    kp_owner_only = create_kp(os.urandom(48), owner, [])
    state = load_service_state(fabric, f"sqlite:///{root / 'state.sqlite'}", node="test-node")
    srv = LiveServer(create_app(state))
    client = HgsClient(srv.url)
    yield {"root": root, "fabric": fabric, "host": host, "rogue": rogue, "kp": kp, "kp_owner_only": kp_owner_only,
           "secret": secret, "state": state, "url": srv.url, "client": client}
    client.close()
    srv.stop()
    state.store.close()


def _post(w, path: str, body: bytes, ctype: str = "application/json") -> httpx.Response:
    return httpx.post(w["url"] + path, content=body, headers={"content-type": ctype}, timeout=30)


def _wcf(r: httpx.Response) -> dict:
    assert r.content.startswith(b'{"__type":'), r.content[:200]
    return json.loads(r.content)


def _assert_no_key(r: httpx.Response, w) -> None:
    assert r.status_code < 500, (r.status_code, r.content[:300])
    assert b"EncryptedTransportKeys" not in r.content and b"HealthCertificate\"" not in r.content
    assert w["secret"] not in r.content and base64.b64encode(w["secret"]) not in r.content


# -- happy path --------------------------------------------------------------------------------

def test_getinfo_signing_certificates_and_metadata(world) -> None:
    c: HgsClient = world["client"]
    info = c.get_info()
    assert info["ProtocolVersions"] == ["2.0"] and isinstance(info["Nonce"], str) and len(info["Nonce"]) >= 40
    assert c.get_info()["Nonce"] != info["Nonce"]
    r = httpx.get(world["url"] + "/Attestation/Getinfo")
    assert r.headers["content-type"].startswith("application/json") and r.content.startswith(b'{"__type":"GetInfoReply:#')
    certs = c.signing_certificates()
    assert certs == [world["state"].signer_cert]
    from templatetool.guardian import import_metadata

    g = import_metadata(c.metadata(), "fabric", allow_untrusted_root=True)
    assert g.encryption_certificate == world["state"].guardian.encryption_certificate


def test_attest_and_release_over_http(world) -> None:
    c: HgsClient = world["client"]
    host = world["host"]
    hc = c.attest(host)
    verify_health_certificate(hc, c.signing_certificates()[0])
    assert hc.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        host.encryption_key.public_key().public_bytes(serialization.Encoding.DER,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    assert c.release(world["kp"], host, hc) == world["secret"]
    # the audit log records the attestation and the release (host, certificate, KP hash), never the key
    log = world["state"].store.audit_log()
    rel = [r for r in log if r["event"] == "release" and r["outcome"] == "granted"]
    assert rel and rel[-1]["host"] == "host-01" and rel[-1]["node"] == "test-node"
    assert rel[-1]["key_protector"] == hashlib.sha256(world["kp"]).hexdigest()
    assert rel[-1]["health_certificate"] == health_fingerprint(hc)
    assert any(r["event"] == "attest" and r["outcome"] == "granted" and r["host"] == "host-01" for r in log)
    dump = json.dumps(log)
    assert world["secret"].hex() not in dump and base64.b64encode(world["secret"]).decode() not in dump


# -- attestation refusals ----------------------------------------------------------------------

def test_replayed_nonce_refused(world) -> None:
    c: HgsClient = world["client"]
    ev = create_evidence(world["host"], nonce=c.get_info()["Nonce"])
    c.attest_evidence(ev)
    r = _post(world, ATTEST, dump_wcf("AttestationRequest", {"Evidence": base64.b64encode(ev).decode()}))
    assert r.status_code == 403 and _wcf(r)["__type"] == wcf_type("NonceErrorReply"), r.content
    _assert_no_key(r, world)
    with pytest.raises(PolicyError, match="nonce"):
        c.attest_evidence(ev)


def test_unknown_nonce_refused(world) -> None:
    with pytest.raises(PolicyError, match="nonce"):
        world["client"].attest_evidence(create_evidence(world["host"]))  # a host-made nonce, never issued


def test_unknown_host_refused(world) -> None:
    with pytest.raises(PolicyError, match="host key registered"):
        world["client"].attest(world["rogue"])
    log = world["state"].store.audit_log()
    assert any(r["event"] == "attest" and r["outcome"] == "refused" and r["host"] == "rogue" for r in log)


def test_tampered_evidence_refused(world) -> None:
    ev = json.loads(create_evidence(world["host"], nonce=world["client"].get_info()["Nonce"]))
    ev["evidence"]["host"] = "someone-else"
    r = _post(world, ATTEST, dump_wcf("AttestationRequest", {"Evidence": base64.b64encode(json.dumps(ev).encode()).decode()}))
    assert r.status_code == 403 and _wcf(r)["__type"] == wcf_type("AttestationErrorReply")
    assert "evidence signature" in _wcf(r)["Message"]


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", b'"x"', b'{"Evidence":"AA=="}',                              # not an object / no __type
    b'{"Evidence":"AA==","__type":"AttestationRequest:#Microsoft.Windows.RemoteAttestation.Core"}',  # not first
    b'{"__type":"GetInfoReply:#Microsoft.Windows.RemoteAttestation.Core","Evidence":"AA=="}',       # wrong type
    b'{"__type":"AttestationRequest:#Microsoft.Windows.RemoteAttestation.Core"}',                   # no Evidence
    b'{"__type":"AttestationRequest:#Microsoft.Windows.RemoteAttestation.Core","Evidence":"%%%"}',  # bad base64
    b'{"__type":"AttestationRequest:#Microsoft.Windows.RemoteAttestation.Core","Evidence":"e30="}',  # evidence {}
    b'{"__type":"AttestationRequest:#Microsoft.Windows.RemoteAttestation.Core","Evidence":"AA==","Evidence":"AA=="}',
    b"[" * 100000,
], ids=["syntax", "array", "string", "no-type", "type-not-first", "wrong-type", "no-evidence", "bad-b64",
        "empty-evidence", "duplicate", "deep"])
def test_malformed_attestation_request(world, body: bytes) -> None:
    r = _post(world, ATTEST, body)
    assert r.status_code == 400, (r.status_code, r.content[:300])
    assert _wcf(r)["__type"] == wcf_type("InvalidRequestErrorReply")


def test_oversized_body_refused(world) -> None:
    r = _post(world, ATTEST, b" " * ((4 << 20) + 1))
    assert r.status_code == 400 and "too large" in _wcf(r)["Message"]


def test_unknown_route_and_method(world) -> None:
    r = httpx.get(world["url"] + "/Attestation/v9/nothing")
    assert r.status_code == 404 and _wcf(r)["__type"] == wcf_type("NotFoundErrorReply")
    r = httpx.get(world["url"] + ATTEST)
    assert r.status_code == 405 and _wcf(r)["__type"] == wcf_type("InvalidRequestErrorReply")
    r = httpx.get(world["url"] + ROLL)
    assert r.status_code == 405 and b"<Fault" in r.content


# -- key release refusals ----------------------------------------------------------------------

def _fault(r: httpx.Response) -> str:
    m = re.search(rb"<Code>([A-Za-z]+)</Code>", r.content)
    assert m, r.content[:300]
    return m.group(1).decode()


def test_tampered_kp_refused(world) -> None:
    hc = world["client"].attest(world["host"])
    kp = bytearray(world["kp"])
    i = kp.index(b"<CipherValue>") + 20
    kp[i] = ord("A") if kp[i] != ord("A") else ord("B")
    r = _post(world, ROLL, dump_roll_request(bytes(kp), hc.public_bytes(serialization.Encoding.DER)), "application/xml")
    assert r.status_code == 400 and _fault(r) == "InvalidProtectorException", r.content
    _assert_no_key(r, world)
    with pytest.raises(IntegrityError):
        world["client"].release(bytes(kp), world["host"], hc)
    log = world["state"].store.audit_log()
    assert any(x["event"] == "release" and x["outcome"] == "refused" and x["key_protector"] ==
               hashlib.sha256(bytes(kp)).hexdigest() for x in log)


def test_kp_without_this_guardian_refused(world) -> None:
    hc = world["client"].attest(world["host"])
    r = _post(world, ROLL, dump_roll_request(world["kp_owner_only"], hc.public_bytes(serialization.Encoding.DER)),
              "application/xml")
    assert r.status_code == 403 and _fault(r) == "InvalidWrappingException", r.content
    with pytest.raises(CredentialError):
        world["client"].release(world["kp_owner_only"], world["host"], hc)


def test_expired_health_certificate_refused(world) -> None:
    st = world["state"]
    ev = create_evidence(world["host"])
    hc, _ = attest(st.store.policy(), ev, st.signer_key, st.signer_cert,
                   at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=9))
    st.store.record_health_certificate(health_fingerprint(hc), "host-01", hc.not_valid_before_utc, hc.not_valid_after_utc)
    r = _post(world, ROLL, dump_roll_request(world["kp"], hc.public_bytes(serialization.Encoding.DER)), "application/xml")
    assert r.status_code == 403 and _fault(r) == "HealthCertificateException" and b"expired" in r.content, r.content
    _assert_no_key(r, world)


def test_health_certificate_not_issued_by_the_service_refused(world) -> None:
    """Signed by the attestation signer but never issued by an attestation request: no release."""
    st = world["state"]
    hc, _ = attest(st.store.policy(), create_evidence(world["host"]), st.signer_key, st.signer_cert)
    r = _post(world, ROLL, dump_roll_request(world["kp"], hc.public_bytes(serialization.Encoding.DER)), "application/xml")
    assert r.status_code == 403 and _fault(r) == "HealthCertificateException", r.content
    _assert_no_key(r, world)


def test_foreign_health_certificate_refused(world, tmp_path: Path) -> None:
    from templatetool.hgs import load_attestation

    other = _fabric(tmp_path, "Other")
    key, cert = load_attestation(other)
    pol = AttestationPolicy()
    pol.add_host_key("host-01", pem_public(world["host"].host_key.public_key()))
    hc, _ = attest(pol, create_evidence(world["host"]), key, cert)
    r = _post(world, ROLL, dump_roll_request(world["kp"], hc.public_bytes(serialization.Encoding.DER)), "application/xml")
    assert r.status_code == 403 and _fault(r) == "HealthCertificateException"


@pytest.mark.parametrize("body", [
    b"<not xml", b"<a/>",
    b'<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    b'<RollTransportKeyRequest xmlns="http://schemas.microsoft.com/kps/2014/07">&b;</RollTransportKeyRequest>',
    b'<RollTransportKeyRequest xmlns="http://schemas.microsoft.com/kps/2014/07"><IngressProtector>AA==</IngressProtector>'
    b'</RollTransportKeyRequest>',
    b'<RollTransportKeyRequest xmlns="http://schemas.microsoft.com/kps/2014/07"><IngressProtector>%%</IngressProtector>'
    b'<HealthCertificate>AA==</HealthCertificate></RollTransportKeyRequest>',
], ids=["syntax", "wrong-root", "entities", "no-health-cert", "bad-b64-kp"])
def test_malformed_roll_request(world, body: bytes) -> None:
    r = _post(world, ROLL, body, "application/xml")
    want = "InvalidProtectorException" if b"%%" in body else "InvalidRequestException"
    assert r.status_code == 400 and _fault(r) == want, (r.status_code, r.content[:300])


def test_garbage_health_certificate_and_kp(world) -> None:
    hc = world["client"].attest(world["host"])
    r = _post(world, ROLL, dump_roll_request(world["kp"], b"\x30\x03\x02\x01\x01"), "application/xml")
    assert r.status_code in (400, 403) and _fault(r) in ("HealthCertificateException", "InvalidRequestException")
    for bad in (b"<Protector/>", b"<not xml", b"\x00\xff" * 10):
        r = _post(world, ROLL, dump_roll_request(bad, hc.public_bytes(serialization.Encoding.DER)), "application/xml")
        assert r.status_code == 400 and _fault(r) == "InvalidProtectorException", r.content
        _assert_no_key(r, world)


def test_mutated_requests_never_500_never_a_key(world) -> None:
    """Random byte mutations of valid requests: always a documented 4xx reply (or a 200 for a
    mutation that kept the request valid), never a 500, never the secret in clear."""
    import random

    rnd = random.Random(16)
    c: HgsClient = world["client"]
    hc = c.attest(world["host"])
    roll = dump_roll_request(world["kp"], hc.public_bytes(serialization.Encoding.DER))
    statuses = []
    for i in range(40):
        ev = create_evidence(world["host"], nonce=c.get_info()["Nonce"])
        att = dump_wcf("AttestationRequest", {"Evidence": base64.b64encode(ev).decode()})
        path, body = (ATTEST, att) if i % 2 else (ROLL, roll)
        b = bytearray(body)
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(3)
            j = rnd.randrange(len(b))
            if op == 0:
                b[j] = rnd.randrange(256)
            elif op == 1:
                del b[j:j + rnd.randint(1, 40)]
            else:
                b[j:j] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        r = _post(world, path, bytes(b), "application/json" if path == ATTEST else "application/xml")
        statuses.append(r.status_code)
        assert r.status_code in (200, 400, 403), (i, r.status_code, r.content[:300])
        assert world["secret"] not in r.content and base64.b64encode(world["secret"]) not in r.content
    assert statuses.count(400) + statuses.count(403) >= 30, statuses


# -- the shielded VM, unlocked with a key released over HTTP -------------------------------------

def test_shielded_vm_unlocks_with_key_released_over_http(tmp_path: Path) -> None:
    """The demo's shielded VM: attest + release over HTTP, then the host side of pipeline/unlock."""
    from templatetool.bitlocker import open_fve
    from templatetool.disk import open_disk, select_volume
    from templatetool.pipeline.demo import run_demo
    from templatetool.pipeline.shield import VmSecret
    from templatetool.pipeline.unlock import read_vtpm_state, tpm_payloads, unseal_in_vm_vtpm

    d = tmp_path / "demo"
    run_demo(GOLDEN, d, say=lambda s: None)
    state = load_service_state(d / "fabric", f"sqlite:///{tmp_path / 's.sqlite'}")
    srv = LiveServer(create_app(state))
    try:
        host = load_host(d / "host")
        with HgsClient(srv.url) as c:
            hc = c.attest(host)
            state_sha = hashlib.sha256((d / "vm.vtpm").read_bytes()).hexdigest()  # the state the host boots
            sec = VmSecret.from_bytes(c.release((d / "vm.kp").read_bytes(), host, hc, state_sha))
    finally:
        srv.stop()
        state.store.close()
    with open_disk(d / "vm.vhdx") as disk:
        view, _ = select_volume(disk, None)
        fve = open_fve(view)
        # the VM's own vTPM (swtpm on VM.vtpm with the released K) unseals the VMK
        entry, _how = unseal_in_vm_vtpm(read_vtpm_state(d / "vm.vtpm", sec), sec, tpm_payloads(fve))
        plain = fve.unlock(vmk=bytes(entry[-32:]))
        with open_disk(d / "template.vhdx") as tdisk:
            tview, _ = select_volume(tdisk, None)
            assert plain.read(0, 1 << 20) == tview.read(0, 1 << 20)   # the plaintext NTFS boot region


# -- CLI ---------------------------------------------------------------------------------------

def test_cli_serve(world, tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "templatetool.cli.main", "hgs", "serve", str(world["fabric"]),
                          "--port", "0", "--db", f"sqlite:///{tmp_path / 'cli.sqlite'}"],
                         cwd=str(ROOT), stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        with HgsClient(m.group(1)) as c:
            hc = c.attest(world["host"])
            assert c.release(world["kp"], world["host"], hc) == world["secret"]
    finally:
        p.terminate()
        p.wait(10)
        p.stderr.close()
    assert p.returncode in (0, -15)
    # `hgs audit` reads the same store: the attestation and the release, granted
    cp = run_cli("hgs", "audit", str(world["fabric"]), "--db", f"sqlite:///{tmp_path / 'cli.sqlite'}", "--json")
    assert cp.returncode == 0, cp.stderr
    recs = json.loads(cp.stdout)["result"]["records"]
    assert [(r["event"], r["outcome"], r["host"]) for r in recs] == [("attest", "granted", "host-01"),
                                                                     ("release", "granted", "host-01")]
    empty = tmp_path / "nostate"
    empty.mkdir()
    assert_clean_error(run_cli("hgs", "audit", str(empty)), 9)


def test_cli_serve_errors(world, tmp_path: Path) -> None:
    from templatetool.cli.hgs_serve_cmd import bind_socket

    s = bind_socket("127.0.0.1", 0)
    try:
        cp = run_cli("hgs", "serve", str(world["fabric"]), "--port", str(s.getsockname()[1]))
        assert_clean_error(cp, 8)
    finally:
        s.close()
    assert_clean_error(run_cli("hgs", "serve", str(world["fabric"]), "--port", "0", "--db", "nosuchdb://x"), 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("hgs", "serve", str(empty), "--port", "0"), 9)


# -- state store -------------------------------------------------------------------------------

def test_store_policy_follows_the_guardian_folder(tmp_path: Path) -> None:
    """The store mirrors attestation.json on start: a host removed from the folder is refused."""
    from templatetool.hgs.store import SCHEMA_VERSION, Store

    fabric = _fabric(tmp_path)
    h = new_host("h1", tmp_path / "h1", key="ec-p256")
    pol = AttestationPolicy.load(fabric)
    pol.add_host_key("h1", pem_public(h.host_key.public_key()))
    pol.allow_ci_policy("ab" * 32)
    pol.pcr_baseline = {7: "00" * 32}
    pol.save(fabric)
    url = f"sqlite:///{tmp_path / 'st.sqlite'}"
    st = load_service_state(fabric, url)
    got = st.store.policy()
    assert got.host_keys == pol.host_keys and got.ci_policies == ["ab" * 32] and got.pcr_baseline == {7: "00" * 32}
    st.store.close()
    pol.host_keys.clear()
    pol.ci_policies.clear()
    pol.pcr_baseline.clear()
    pol.save(fabric)
    st = load_service_state(fabric, url)
    try:
        got = st.store.policy()
        assert got.host_keys == {} and got.ci_policies == [] and got.pcr_baseline == {}
        assert st.store.migrate() == SCHEMA_VERSION
    finally:
        st.store.close()
    # a database of another schema version is refused, not silently used
    s = Store(url)
    with s.engine.begin() as c:
        c.execute(s.t["schema_version"].update().values(version=99))
    from templatetool.errors import FormatError

    with pytest.raises(FormatError, match="schema version"):
        s.migrate()
    s.close()


def test_nonce_single_use_and_expiry(tmp_path: Path) -> None:
    from templatetool.hgs.store import Store

    s = Store(f"sqlite:///{tmp_path / 'n.sqlite'}")
    s.migrate()
    n, _ = s.new_nonce()
    s.consume_nonce(n)
    with pytest.raises(PolicyError, match="nonce"):
        s.consume_nonce(n)
    old, _ = s.new_nonce(seconds=-1)
    with pytest.raises(PolicyError, match="nonce"):
        s.consume_nonce(old)
    with pytest.raises(PolicyError, match="nonce"):
        s.consume_nonce("x" * 65)
    s.close()


def test_cli_serve_tls(world, tmp_path: Path) -> None:
    """`hgs serve --tls-cert/--tls-key-file`: HTTPS, verified by the client against that certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hgs.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "tls.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf = tmp_path / "tls.key"
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    kf.chmod(0o600)
    p = subprocess.Popen([sys.executable, "-m", "templatetool.cli.main", "hgs", "serve", str(world["fabric"]),
                          "--port", "0", "--db", f"sqlite:///{tmp_path / 'tls.sqlite'}", "--tls-cert",
                          str(tmp_path / "tls.pem"), "--tls-key-file", str(kf)],
                         cwd=str(ROOT), stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"on (https://127\.0\.0\.1:\d+)", p.stderr.readline())
        assert m
        import ssl

        ctx = ssl.create_default_context(cafile=str(tmp_path / "tls.pem"))
        with HgsClient(m.group(1), verify=ctx) as c:
            hc = c.attest(world["host"])
            assert c.release(world["kp"], world["host"], hc) == world["secret"]
        with pytest.raises(httpx.ConnectError):   # an unverified server certificate is refused
            httpx.get(m.group(1) + "/Attestation/Getinfo")
    finally:
        p.terminate()
        p.wait(10)
        p.stderr.close()
    (tmp_path / "bad.pem").write_text("not a cert")
    assert_clean_error(run_cli("hgs", "serve", str(world["fabric"]), "--port", "0", "--tls-cert",
                               str(tmp_path / "bad.pem"), "--tls-key-file", str(kf)), 3)
    assert_clean_error(run_cli("hgs", "serve", str(world["fabric"]), "--port", "0", "--tls-cert",
                               str(tmp_path / "tls.pem")), 2)
