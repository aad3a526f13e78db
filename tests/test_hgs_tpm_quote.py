"""TPM quote attestation over `hgs serve`, judged by a real TPM 2.0 (swtpm via tpm2-pytss): the AK is
certified against the EK by MakeCredential/ActivateCredential, the quote carries the round's nonce
and the quoted PCRs must equal the TCG log's replay."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest

from .conftest import require_module, require_tool

os.environ.setdefault("TSS2_LOG", "all+NONE")
httpx = require_module("httpx")
require_module("uvicorn")
require_module("sqlalchemy")

from templatetool.errors import PolicyError  # noqa: E402
from templatetool.hgs import AttestationPolicy, create_evidence, new_host  # noqa: E402
from templatetool.hgs.client import HgsClient  # noqa: E402
from templatetool.hgs.host import pem_public  # noqa: E402
from templatetool.hgs.service import create_app, load_service_state, quote_qualifying  # noqa: E402
from templatetool.hgs.wire import b64, dump_wcf, wcf_type  # noqa: E402
from templatetool.kp import create_kp  # noqa: E402
from templatetool.tpm.eventlog import write_agile_log  # noqa: E402

from .test_hgs_service import LiveServer, _fabric  # noqa: E402

SHA1, SHA256 = 0x0004, 0x000B
EVENTS = [(0, b"firmware"), (4, b"bootmgr v1"), (7, b"secureboot=1"), (11, b"bitlocker")]
ATTEST = "/Attestation/v2.0/hostkeyattest"


def _log() -> bytes:
    return write_agile_log([(pcr, 0x80000001, {SHA1: hashlib.sha1(d).digest(), SHA256: hashlib.sha256(d).digest()}, d)
                            for pcr, d in EVENTS])


def _extend(tpm, pcr: int, data: bytes) -> None:
    import tpm2_pytss as t

    has = []
    for alg, fn in ((SHA1, hashlib.sha1), (SHA256, hashlib.sha256)):
        ha = t.TPMT_HA(hashAlg=alg)
        setattr(ha.digest, fn().name, fn(data).digest())
        has.append(ha)
    tpm.esys.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), t.TPML_DIGEST_VALUES(has))


@pytest.fixture
def booted(tmp_path: Path):
    """A swtpm whose PCRs were extended exactly as the TCG log says (a measured boot)."""
    require_tool("swtpm")
    require_module("tpm2_pytss")
    from templatetool.hgs.tpmhost import TpmHost
    from templatetool.tpm.swtpm import Swtpm

    with Swtpm(tmp_path / "swtpm") as sw:
        tpm = TpmHost(sw.tcti)
        for pcr, d in EVENTS:
            _extend(tpm, pcr, d)
        try:
            yield tpm
        finally:
            tpm.close()


@pytest.fixture
def fabric(tmp_path: Path, booted):
    d = _fabric(tmp_path)
    host = new_host("tpm-host", tmp_path / "host", key="ec-p256")
    pol = AttestationPolicy.load(d)
    pol.add_tpm_host("tpm-host", booted.ek_pem())
    pol.set_baseline_from_log(_log())
    pol.save(d)
    from templatetool.guardian.model import generate_guardian, load_guardian

    secret = os.urandom(32)
    kp = create_kp(secret, generate_guardian("Owner", "ec-p256"), [load_guardian(d)])
    state = load_service_state(d, f"sqlite:///{tmp_path / 'state.sqlite'}")
    srv = LiveServer(create_app(state))
    c = HgsClient(srv.url)
    yield {"dir": d, "host": host, "tpm": booted, "client": c, "state": state, "url": srv.url, "kp": kp, "secret": secret}
    c.close()
    srv.stop()
    state.store.close()


def test_tpm_quote_attestation_and_release(fabric) -> None:
    c: HgsClient = fabric["client"]
    hc = c.attest_tpm(fabric["host"], fabric["tpm"], _log())
    assert c.release(fabric["kp"], fabric["host"], hc) == fabric["secret"]
    granted = [r for r in fabric["state"].store.audit_log() if r["event"] == "attest" and r["outcome"] == "granted"]
    assert "TPM quote: ok" in granted[-1]["detail"] and "AK certified by the EK: ok" in granted[-1]["detail"]


def test_one_more_pcr7_extend_refused(fabric) -> None:
    _extend(fabric["tpm"], 7, b"an unmeasured boot application")
    with pytest.raises(PolicyError, match="quoted PCRs differ"):
        fabric["client"].attest_tpm(fabric["host"], fabric["tpm"], _log())


def test_log_of_another_boot_refused(fabric) -> None:
    """A log that matches the baseline but not this TPM's PCRs: the quote exposes it."""
    log = write_agile_log([(0, 0x80000001, {SHA256: hashlib.sha256(b"other").digest()}, b"other")])
    with pytest.raises(PolicyError, match="quoted PCRs differ|PCR baseline"):
        fabric["client"].attest_tpm(fabric["host"], fabric["tpm"], log)


def test_unregistered_ek_refused(fabric, tmp_path: Path) -> None:
    from templatetool.hgs.tpmhost import TpmHost
    from templatetool.tpm.swtpm import Swtpm

    with Swtpm(tmp_path / "other") as sw, TpmHost(sw.tcti) as other:
        with pytest.raises(PolicyError, match="EK not registered"):
            fabric["client"].attest_tpm(fabric["host"], other, _log())


def test_quote_must_cover_the_baseline(fabric) -> None:
    with pytest.raises(PolicyError, match="does not cover baseline"):
        fabric["client"].attest_tpm(fabric["host"], fabric["tpm"], _log(), pcrs=[0, 7])


def _round1(fabric) -> tuple[str, bytes, dict, dict]:
    c: HgsClient = fabric["client"]
    tpm = fabric["tpm"]
    nonce = c.get_info()["Nonce"]
    ev = create_evidence(fabric["host"], tcg_log=_log(), ek_public_pem=tpm.ek_pem(), nonce=nonce)
    base = {"Evidence": b64(ev), "EkPublic": b64(tpm.ek_public), "AkPublic": b64(tpm.ak_public)}
    r = httpx.post(fabric["url"] + ATTEST, content=dump_wcf("AttestationRequest", base))
    assert r.status_code == 200, r.content
    ch = json.loads(r.content)
    assert ch["__type"] == wcf_type("TpmChallengeReply")
    return nonce, ev, base, ch


def _round2(fabric, nonce: str, base: dict, credential: bytes) -> httpx.Response:
    tpm = fabric["tpm"]
    quote, sig = tpm.quote(quote_qualifying(nonce, credential), [0, 1, 2, 3, 4, 5, 7, 11])
    body = dump_wcf("AttestationRequest", {**base, "Credential": b64(credential), "Quote": b64(quote),
                                           "QuoteSignature": b64(sig)})
    return httpx.post(fabric["url"] + ATTEST, content=body)


def test_guessed_credential_refused_and_round2_not_replayable(fabric) -> None:
    nonce, _ev, base, ch = _round1(fabric)
    r = _round2(fabric, nonce, base, os.urandom(32))   # a host that cannot ActivateCredential
    assert r.status_code == 403 and "credential does not answer" in json.loads(r.content)["Message"]
    assert b"HealthCertificate\"" not in r.content
    # the real answer after a failed try: the nonce is spent
    cred = fabric["tpm"].activate(base64.b64decode(ch["CredentialBlob"]), base64.b64decode(ch["EncryptedSecret"]))
    r = _round2(fabric, nonce, base, cred)
    assert r.status_code == 403 and json.loads(r.content)["__type"] == wcf_type("NonceErrorReply")


def test_quote_without_challenge_round_refused(fabric) -> None:
    c: HgsClient = fabric["client"]
    nonce = c.get_info()["Nonce"]
    ev = create_evidence(fabric["host"], tcg_log=_log(), ek_public_pem=fabric["tpm"].ek_pem(), nonce=nonce)
    base = {"Evidence": b64(ev), "EkPublic": b64(fabric["tpm"].ek_public), "AkPublic": b64(fabric["tpm"].ak_public)}
    r = _round2(fabric, nonce, base, os.urandom(32))
    assert r.status_code == 403 and "no credential challenge" in json.loads(r.content)["Message"]


def test_other_ak_refused(fabric, tmp_path: Path) -> None:
    """Round 2 with an AK other than the one the credential was made for (another TPM's): refused."""
    from templatetool.hgs.tpmhost import TpmHost
    from templatetool.tpm.swtpm import Swtpm

    nonce, _ev, base, ch = _round1(fabric)
    cred = fabric["tpm"].activate(base64.b64decode(ch["CredentialBlob"]), base64.b64decode(ch["EncryptedSecret"]))
    with Swtpm(tmp_path / "other") as sw, TpmHost(sw.tcti) as other:
        for pcr, d in EVENTS:
            _extend(other, pcr, d)
        quote, sig = other.quote(quote_qualifying(nonce, cred), [0, 1, 2, 3, 4, 5, 7, 11])
    body = dump_wcf("AttestationRequest", {**base, "AkPublic": b64(other.ak_public), "Credential": b64(cred),
                                           "Quote": b64(quote), "QuoteSignature": b64(sig)})
    r = httpx.post(fabric["url"] + ATTEST, content=body)
    assert r.status_code == 403 and "AK is not the one" in json.loads(r.content)["Message"], r.content


def test_tampered_quote_refused(fabric) -> None:
    nonce, _ev, base, ch = _round1(fabric)
    cred = fabric["tpm"].activate(base64.b64decode(ch["CredentialBlob"]), base64.b64decode(ch["EncryptedSecret"]))
    quote, sig = fabric["tpm"].quote(quote_qualifying(nonce, cred), [0, 1, 2, 3, 4, 5, 7, 11])
    bad = bytearray(quote)
    bad[-1] ^= 1   # last byte of the PCR digest
    body = dump_wcf("AttestationRequest", {**base, "Credential": b64(cred), "Quote": b64(bytes(bad)),
                                           "QuoteSignature": b64(sig)})
    r = httpx.post(fabric["url"] + ATTEST, content=body)
    assert r.status_code == 403 and "quote signature does not verify" in json.loads(r.content)["Message"], r.content


def test_tpm_evidence_without_quote_gets_no_certificate(fabric) -> None:
    """The offline model's TPM evidence (a host-signed log, no AK) only opens a challenge round."""
    c: HgsClient = fabric["client"]
    ev = create_evidence(fabric["host"], tcg_log=_log(), ek_public_pem=fabric["tpm"].ek_pem(), nonce=c.get_info()["Nonce"])
    r = httpx.post(fabric["url"] + ATTEST, content=dump_wcf("AttestationRequest", {"Evidence": b64(ev)}))
    assert r.status_code == 400 and b"EkPublic" in r.content and b"HealthCertificate\"" not in r.content
