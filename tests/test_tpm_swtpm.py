"""vTPM sealing judged by a real TPM 2.0 implementation: swtpm (libtpms) driven through tpm2-pytss.

Each test gets a fresh swtpm on a free loopback port pair, killed at teardown.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest
from conftest import assert_clean_error, require_module, require_tool, run_cli

os.environ.setdefault("TSS2_LOG", "all+NONE")

from templatetool.errors import CredentialError, IntegrityError, NotFoundError, PolicyError  # noqa: E402
from templatetool.tpm import keys, policy  # noqa: E402
from templatetool.tpm import structs as s  # noqa: E402
from templatetool.tpm.eventlog import replay_log, write_agile_log, write_sha1_log  # noqa: E402
from templatetool.tpm.protector import make_sealer, parse_protector, seal_to_parent, unseal_with_tpm  # noqa: E402
from templatetool.tpm.swtpm import Swtpm  # noqa: E402

HASHLIB = {s.ALG_SHA1: "sha1", s.ALG_SHA256: "sha256", s.ALG_SHA384: "sha384"}
SRK_TEMPLATES = {"rsa": "rsa2048:aes128cfb", "ecc": "ecc256:aes128cfb"}


@pytest.fixture
def tpm(tmp_path):
    require_tool("swtpm")
    t = require_module("tpm2_pytss")
    with Swtpm(tmp_path / "state") as sw:
        esys = t.ESAPI(sw.tcti_loader())
        sw.esys = esys
        try:
            yield sw
        finally:
            esys.close()


def _t():
    import tpm2_pytss

    return tpm2_pytss


def create_srk(esys, kind="rsa"):
    t = _t()
    tmpl = t.TPM2B_PUBLIC.parse(SRK_TEMPLATES[kind], objectAttributes=keys.SRK_ATTRIBUTES)
    h, pub, *_ = esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, t.ESYS_TR.OWNER)
    return h, pub


def extend(esys, pcr, digests: dict[int, bytes]):
    t = _t()
    has = []
    for a, d in digests.items():
        ha = t.TPMT_HA(hashAlg=a)
        setattr(ha.digest, HASHLIB[a], d)
        has.append(ha)
    vals = t.TPML_DIGEST_VALUES(has)
    esys.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), vals)


def pcr_read(esys, bank: int, pcrs: list[int]) -> dict[int, bytes]:
    t = _t()
    out: dict[int, bytes] = {}
    for i in range(0, len(pcrs), 8):
        chunk = pcrs[i:i + 8]
        name = {s.ALG_SHA1: "sha1", s.ALG_SHA256: "sha256", s.ALG_SHA384: "sha384"}[bank]
        _, sel, vals = esys.pcr_read(t.TPML_PCR_SELECTION.parse(f"{name}:" + ",".join(map(str, chunk))))
        got = [i for i in range(24) if sel.pcrSelections[0].pcrSelect[i // 8] >> (i % 8) & 1]
        out.update({p: bytes(v) for p, v in zip(got, vals.digests, strict=True)})
    return out


def trial_digest(esys, selection: bytes, auth_value: bool) -> bytes:
    t = _t()
    sess = esys.start_auth_session(t.ESYS_TR.NONE, t.ESYS_TR.NONE, t.TPM2_SE.TRIAL,
                                   t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL), t.TPM2_ALG.SHA256)
    try:
        esys.policy_pcr(sess, t.TPM2B_DIGEST(), t.TPML_PCR_SELECTION.unmarshal(selection)[0])
        if auth_value:
            esys.policy_auth_value(sess)
        return bytes(esys.policy_get_digest(sess))
    finally:
        esys.flush_context(sess)


POLICY_CASES = [
    (s.ALG_SHA256, [7], False), (s.ALG_SHA256, [7, 11], False), (s.ALG_SHA256, [7, 11], True),
    (s.ALG_SHA256, [0, 2, 4, 11], False), (s.ALG_SHA256, [0, 2, 4, 8, 9, 10, 11], True),
    (s.ALG_SHA256, [23], False), (s.ALG_SHA256, list(range(17)), False), (s.ALG_SHA1, [7, 11], False),
    (s.ALG_SHA1, [0, 1, 2, 3], True), (s.ALG_SHA384, [7], False), (s.ALG_SHA384, [4, 7, 11, 14], True),
    (s.ALG_SHA384, [16, 23], False),
]


def test_offline_policy_digests_equal_the_tpms(tpm):
    """12 PCR sets over sha1/sha256/sha384 (with and without PolicyAuthValue) after extending
    PCRs with known digests: our offline digest == TPM2_PolicyGetDigest of a trial session in
    which the TPM uses its own current PCRs."""
    esys = tpm.esys
    predicted = {a: {i: bytes(hashlib.new(n).digest_size) for i in range(24)} for a, n in HASHLIB.items()}
    for pcr in (0, 2, 4, 7, 11, 14, 16, 23):
        for round_ in range(2):
            digs = {a: hashlib.new(n, f"{pcr}-{round_}".encode()).digest() for a, n in HASHLIB.items()}
            extend(esys, pcr, digs)
            for a, n in HASHLIB.items():
                predicted[a][pcr] = hashlib.new(n, predicted[a][pcr] + digs[a]).digest()
    for bank, pcrs, auth in POLICY_CASES:
        assert pcr_read(esys, bank, pcrs) == {i: predicted[bank][i] for i in pcrs}
        pol = policy.compute_policy(bank, {i: predicted[bank][i] for i in pcrs}, auth_value=auth)
        assert pol.digest == trial_digest(esys, pol.selection, auth), (bank, pcrs, auth)


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_sealed_to_srk_unseals_only_with_sealed_pcrs(tpm, kind):
    """Offline blob for the swtpm's SRK (RSA / ECC): Import+Load+PolicyPCR+Unseal returns the
    secret once PCR 7 and 11 hold the sealed values; one more extend and the TPM refuses."""
    esys = tpm.esys
    t = _t()
    srk, pub = create_srk(esys, kind)
    parent = keys.parse_parent_bytes(pub.marshal())
    assert parent.name == bytes(esys.tr_get_name(srk))
    # predict the values for two boot measurements, seal before they happen
    ev7, ev11 = hashlib.sha256(b"secure boot vars").digest(), hashlib.sha256(b"bootmgr").digest()
    z = bytes(32)
    want = {7: hashlib.sha256(z + ev7).digest(), 11: hashlib.sha256(z + ev11).digest()}
    secret = os.urandom(44)
    payload, mask = make_sealer(parent, [7, 11], want)(secret)
    assert mask == (1 << 7) | (1 << 11)
    # not booted yet: PCRs are still zero -> refused
    with pytest.raises(PolicyError):
        unseal_with_tpm(payload, tpm.tcti, esys=esys)
    extend(esys, 7, {s.ALG_SHA256: ev7})
    extend(esys, 11, {s.ALG_SHA256: ev11})
    assert unseal_with_tpm(payload, tpm.tcti, esys=esys) == secret
    extend(esys, 11, {s.ALG_SHA256: ev11})
    with pytest.raises(PolicyError):
        unseal_with_tpm(payload, tpm.tcti, esys=esys)
    esys.flush_context(srk)
    # no transient objects leak from the unsealer (swtpm has only 3 slots)
    _, caps = esys.get_capability(t.TPM2_CAP.HANDLES, t.TPM2_HT.TRANSIENT << 24, 10)
    assert len(caps.data.handles) == 0


def test_persistent_srk_and_wrong_parent(tpm):
    """The SRK persisted at 0x81000001 (where Windows keeps it) is found by Name; a blob sealed
    to a different key is refused (not found), a tampered blob is rejected by TPM2_Import."""
    esys = tpm.esys
    t = _t()
    srk, pub = create_srk(esys, "ecc")
    esys.evict_control(t.ESYS_TR.OWNER, srk, s.SRK_HANDLE)
    esys.flush_context(srk)
    parent = keys.parse_parent_bytes(pub.marshal())
    pcrs = pcr_read(esys, s.ALG_SHA256, [7])
    payload = seal_to_parent(parent, b"k" * 32, "sha256", pcrs)
    assert unseal_with_tpm(payload, tpm.tcti, esys=esys) == b"k" * 32
    # tamper with the encrypted sensitive area: the outer HMAC fails inside the TPM
    prot = parse_protector(payload)
    bad = bytearray(payload)
    pos = payload.index(prot.blob.duplicate) + len(prot.blob.duplicate) - 1
    bad[pos] ^= 1
    with pytest.raises(IntegrityError):
        unseal_with_tpm(bytes(bad), tpm.tcti, esys=esys)
    other = keys.parse_parent_public(keys.template_public(keys.generate_storage_key("ecc").public_key()))
    with pytest.raises(NotFoundError):
        unseal_with_tpm(seal_to_parent(other, b"x" * 32, "sha256", pcrs), tpm.tcti, esys=esys)


def test_pin_right_wrong_and_counted(tpm):
    """TPM+PIN: the right PIN unseals; a wrong PIN is refused by the TPM and increments the
    dictionary-attack counter (noDA is clear on PIN objects)."""
    from templatetool.tpm.tpmclient import lockout_counter

    esys = tpm.esys
    srk, pub = create_srk(esys, "rsa")
    parent = keys.parse_parent_bytes(pub.marshal())
    payload = seal_to_parent(parent, b"p" * 32, "sha256", pcr_read(esys, s.ALG_SHA256, [7, 11]), pin="123456")
    pubarea = s.TPMT_PUBLIC.parse(parse_protector(payload).blob.public)
    assert not pubarea.objectAttributes & s.ATTR_NO_DA
    assert unseal_with_tpm(payload, tpm.tcti, esys=esys, pin="123456") == b"p" * 32
    before = lockout_counter(esys)
    with pytest.raises(CredentialError):
        unseal_with_tpm(payload, tpm.tcti, esys=esys, pin="654321")
    assert lockout_counter(esys) == before + 1
    with pytest.raises(CredentialError):
        unseal_with_tpm(payload, tpm.tcti, esys=esys)  # no PIN at all


@pytest.mark.parametrize("ektype", ["EK-RSA2048", "EK-ECC256"])
def test_ek_certificate_parent(tpm, ektype):
    """Seal to the EK given only as an X.509 certificate: the Name we rebuild from the TCG EK
    template equals the swtpm EK's (template from tpm2-pytss); unseal via PolicySecret(endorsement)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template

    esys = tpm.esys
    t = _t()

    def nv_read(index):
        raise NoSuchIndex(index)

    _, tmpl = create_ek_template(ektype, nv_read)
    ek, ekpub, *_ = esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, t.ESYS_TR.ENDORSEMENT)
    ca = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(name)
            .public_key(serialization.load_pem_public_key(ekpub.to_pem()))
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(name)]), critical=True)
            .sign(ca, hashes.SHA256()))
    parent = keys.parse_parent_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert parent.name == bytes(esys.tr_get_name(ek))
    payload = seal_to_parent(parent, b"e" * 32, "sha256", pcr_read(esys, s.ALG_SHA256, [7]))
    assert parse_protector(payload).parent_handle == s.EK_HANDLE
    if ektype == "EK-RSA2048":  # persisted where provisioning puts it: found by handle
        esys.evict_control(t.ESYS_TR.OWNER, ek, s.EK_HANDLE)
    esys.flush_context(ek)  # (ECC) the unsealer must re-create the EK itself
    assert unseal_with_tpm(payload, tpm.tcti, esys=esys) == b"e" * 32


def test_event_log_replay_equals_swtpm_pcrs(tpm, tmp_path):
    """A crypto-agile log (sha1+sha256+sha384) and a legacy SHA-1 log, written with known events:
    replayed PCRs equal PCR_Read of a swtpm into which the same digests were extended."""
    esys = tpm.esys
    banks = {s.ALG_SHA1: 20, s.ALG_SHA256: 32, s.ALG_SHA384: 48}
    events = []
    for n, pcr in enumerate([0, 0, 1, 2, 4, 4, 5, 7, 7, 7, 11, 14, 16, 23]):
        data = f"event {n} pcr {pcr}".encode()
        digs = {a: hashlib.new(HASHLIB[a], data).digest() for a in banks}
        events.append((pcr, 0x80000001 + n % 3, digs, data))
        extend(esys, pcr, digs)
        if n == 5:  # an EV_NO_ACTION is logged but never extended
            events.append((pcr, s.EV_NO_ACTION, {a: bytes(sz) for a, sz in banks.items()}, b"noise"))
    log = tmp_path / "agile.bin"
    log.write_bytes(write_agile_log(events, banks))
    r = replay_log(log)
    assert r.format == "crypto-agile" and r.startup_locality == 0
    measured = sorted({e[0] for e in events})
    assert r.measured == measured
    for a, name in HASHLIB.items():
        tpm_vals = pcr_read(esys, a, list(range(24)))
        for i in range(24):
            if i in range(17, 23):
                continue  # D-RTM PCRs: not extendable at locality 0; reset value checked below
            assert r.values_by_bank[name][i] == tpm_vals[i], (name, i)
        assert r.values_by_bank[name][17] == tpm_vals[17]
    # legacy SHA-1 format against the sha1 bank
    legacy = write_sha1_log([(p, t_, d[s.ALG_SHA1], data) for p, t_, d, data in events if t_ != s.EV_NO_ACTION])
    r1 = replay_log(legacy)
    assert r1.format == "sha1"
    tpm1 = pcr_read(esys, s.ALG_SHA1, measured)
    assert {i: r1.values_by_bank["sha1"][i] for i in measured} == tpm1


def test_real_event_log_if_present():
    """A real firmware log from this machine, when the kernel exposes one (normally absent here)."""
    p = "/sys/kernel/security/tpm0/binary_bios_measurements"
    if not os.access(p, os.R_OK):
        pytest.skip("no readable firmware event log on this machine")
    r = replay_log(p)
    assert r.event_count > 0 and r.values_by_bank


def test_cli_seal_and_unseal_through_swtpm(tpm, tmp_path):
    """CLI round trip: read the SRK public like tpm2_readpublic -o, seal with --tcg-log, unseal
    with --tpm swtpm:...; after an extra extend the CLI fails with one clean policy error line."""
    esys = tpm.esys
    srk, pub = create_srk(esys, "rsa")
    (tmp_path / "srk.pub").write_bytes(pub.marshal())
    esys.flush_context(srk)
    digs = {s.ALG_SHA256: hashlib.sha256(b"db").digest()}
    (tmp_path / "ref.log").write_bytes(write_agile_log([(7, 0x800000E0, digs, b"db")], {s.ALG_SHA256: 32}))
    (tmp_path / "secret").write_bytes(os.urandom(32))
    cp = run_cli("tpm", "seal", "--parent", str(tmp_path / "srk.pub"), "--pcrs", "7,11", "--tcg-log",
                 str(tmp_path / "ref.log"), "--secret-file", str(tmp_path / "secret"), "-o",
                 str(tmp_path / "blob"), "--json", "--tpm2-tools", str(tmp_path / "obj"))
    assert cp.returncode == 0, cp.stderr
    extend(esys, 7, digs)
    esys.close()  # swtpm serves one client at a time
    try:
        cp = run_cli("tpm", "unseal", str(tmp_path / "blob"), "--tpm", tpm.tcti, "-o", str(tmp_path / "out"))
        assert cp.returncode == 0, cp.stderr
        assert (tmp_path / "out").read_bytes() == (tmp_path / "secret").read_bytes()
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o600
        if shutil.which("tpm2_import"):
            # tpm2-tools (an independent TSS user) imports the same three files
            env = dict(os.environ, TPM2TOOLS_TCTI=tpm.tcti)
            subprocess.run(["tpm2_createprimary", "-C", "o", "-G", "rsa2048:aes128cfb", "-a",
                            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
                            "-c", str(tmp_path / "p.ctx")], check=True, capture_output=True, env=env)
            subprocess.run(["tpm2_import", "-C", str(tmp_path / "p.ctx"), "-u", str(tmp_path / "obj.pub"), "-i",
                            str(tmp_path / "obj.priv"), "-s", str(tmp_path / "obj.seed"), "-r",
                            str(tmp_path / "obj.tpm")], check=True, capture_output=True, env=env)
            subprocess.run(["tpm2_flushcontext", "-t"], check=True, capture_output=True, env=env)
        t = _t()
        esys2 = t.ESAPI(tpm.tcti_loader())
        extend(esys2, 11, digs)
        esys2.close()
        cp = run_cli("tpm", "unseal", str(tmp_path / "blob"), "--tpm", tpm.tcti, "-o", str(tmp_path / "out2"))
        assert_clean_error(cp, 6)
        assert not (tmp_path / "out2").exists()
    finally:
        tpm.esys = _t().ESAPI(tpm.tcti_loader())


def _import_load(esys, srk, blob):
    t = _t()
    pub = t.TPM2B_PUBLIC.unmarshal(blob.tpm2b_public())[0]
    priv = esys.import_(srk, t.TPM2B_DATA(), pub, t.TPM2B_PRIVATE.unmarshal(blob.tpm2b_private())[0],
                        t.TPM2B_ENCRYPTED_SECRET.unmarshal(blob.tpm2b_encrypted_secret())[0],
                        t.TPMT_SYM_DEF_OBJECT(algorithm=t.TPM2_ALG.NULL))
    return esys.load(srk, priv, pub)


def test_no_password_bypass_of_the_pcr_policy(tpm):
    """Our sealed object cannot be unsealed with a plain (empty) password session while the PCRs
    are wrong; the same object hand-built with userWithAuth set *is* (the pitfall the safe
    attributes prevent), which shows this check can fail."""
    from templatetool.tpm import duplicate

    t = _t()
    esys = tpm.esys
    srk, pub = create_srk(esys, "ecc")
    parent = keys.parse_parent_bytes(pub.marshal())
    pol = policy.compute_policy("sha256", {7: b"\x55" * 32})  # not the current value
    blob = duplicate.seal_offline(parent, b"b" * 32, pol.digest)
    obj = _import_load(esys, srk, blob)
    with pytest.raises(t.TSS2_Exception):
        esys.unseal(obj, session1=t.ESYS_TR.PASSWORD)
    esys.flush_context(obj)
    # unsafe variant: set userWithAuth and re-wrap
    public, sensitive = duplicate.sealed_object(b"b" * 32, pol.digest)
    area = bytearray(public)
    area[4:8] = (int.from_bytes(area[4:8], "big") | s.ATTR_USER_WITH_AUTH).to_bytes(4, "big")
    dup, seed = duplicate.wrap(parent, bytes(area), sensitive)
    obj = _import_load(esys, srk, duplicate.SealedBlob(bytes(area), dup, seed))
    assert bytes(esys.unseal(obj, session1=t.ESYS_TR.PASSWORD)) == b"b" * 32
    esys.flush_context(obj)
    esys.flush_context(srk)


def test_sha256_only_vtpm_from_event_log(tmp_path):
    """A vTPM manufactured with only the sha256 bank (like a Hyper-V vTPM): the values replayed
    from a reference log (sha1+sha256) seal correctly for the sha256 bank; sealing to the
    inactive sha1 bank can never be satisfied."""
    require_tool("swtpm", "swtpm_setup")
    t = require_module("tpm2_pytss")
    with Swtpm(tmp_path / "state", pcr_banks="sha256") as sw:
        esys = t.ESAPI(sw.tcti_loader())
        try:
            srk, pub = create_srk(esys, "ecc")
            parent = keys.parse_parent_bytes(pub.marshal())
            data = [b"PK", b"KEK", b"db", b"dbx", b"\0" * 4]
            evs = [(7, 0x800000E0, {s.ALG_SHA1: hashlib.sha1(d).digest(), s.ALG_SHA256: hashlib.sha256(d).digest()}, d)
                   for d in data]
            log = write_agile_log(evs)
            sha256_seal = make_sealer(parent, [7], tcg_log=log)
            sha1_seal = make_sealer(parent, [7], tcg_log=log, bank="sha1")
            p256, _ = sha256_seal(b"a" * 32)
            p1, _ = sha1_seal(b"a" * 32)
            for _, _, digs, _ in evs:
                extend(esys, 7, {s.ALG_SHA256: digs[s.ALG_SHA256]})
            assert unseal_with_tpm(p256, sw.tcti, esys=esys) == b"a" * 32
            with pytest.raises(PolicyError):
                unseal_with_tpm(p1, sw.tcti, esys=esys)
            esys.flush_context(srk)
        finally:
            esys.close()
