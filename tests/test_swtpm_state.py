"""swtpm's encrypted state (tpm2-00.permall with --key) and the vTPM manufacturer, judged by real
swtpm: our decrypt reads what swtpm_setup wrote, swtpm starts on what we encrypted, and refuses a
wrong key or an altered blob. One manufactured vTPM is shared by the module (swtpm_setup ~1 s).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import subprocess

import pytest
from conftest import assert_clean_error, require_module, require_tool, run_cli

os.environ.setdefault("TSS2_LOG", "all+NONE")

from templatetool.errors import CredentialError, FormatError, IntegrityError, PolicyError, UnsupportedError  # noqa: E402
from templatetool.tpm import swtpm_structs as st  # noqa: E402
from templatetool.tpm.swtpm_state import (  # noqa: E402
    decrypt_state,
    encrypt_state,
    new_transport_key,
    parse_state,
    plain_state,
    rekey_state,
)

SECRET = bytes(range(44))
#: What a "boot" measures into PCR 7 before the guest unseals.
BOOT_EVENT = hashlib.sha256(b"templatetool test boot event").digest()
PCR7_AFTER_BOOT = hashlib.sha256(bytes(32) + BOOT_EVENT).digest()


# --- pure format tests (no swtpm) -------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 15, 16, 31, 32, 33, 4213])
def test_pad_to_key_length_roundtrip(size):
    key = new_transport_key()
    plain = os.urandom(size)
    blob = encrypt_state(plain, key)
    b = parse_state(blob)
    ct = b.tlv(st.TAG_ENCRYPTED_DATA)
    # the pad fills to a multiple of the 32-byte key, not of the 16-byte AES block; a full key
    # length of padding when already aligned
    assert len(ct) == (size // 32 + 1) * 32
    assert [t for t, _ in b.tlvs] == [st.TAG_ENCRYPTED_DATA, st.TAG_HMAC, st.TAG_IVEC_ENCRYPTED_DATA]
    assert len(b.tlv(st.TAG_IVEC_ENCRYPTED_DATA)) == 32
    assert blob[:6] == bytes([2, 1, 0, 10, 0, 0x09]) and int.from_bytes(blob[6:10], "big") == len(blob)
    assert decrypt_state(blob, key) == plain


def test_wrong_key_and_tamper_are_integrity_errors():
    key = new_transport_key()
    blob = encrypt_state(os.urandom(100), key)
    with pytest.raises(IntegrityError):
        decrypt_state(blob, new_transport_key())
    b = parse_state(blob)
    offsets = {}
    off = st.HEADER_SIZE
    for tag, v in b.tlvs:
        offsets[tag] = off + 6
        off += 6 + len(v)
    # the HMAC covers the ciphertext and the whole 32-byte IV TLV (also its unused last 16 bytes)
    for tag, delta in ((st.TAG_ENCRYPTED_DATA, 5), (st.TAG_HMAC, 0), (st.TAG_IVEC_ENCRYPTED_DATA, 0),
                       (st.TAG_IVEC_ENCRYPTED_DATA, 31)):
        bad = bytearray(blob)
        bad[offsets[tag] + delta] ^= 1
        with pytest.raises(IntegrityError):
            decrypt_state(bytes(bad), key)
    with pytest.raises(CredentialError):
        decrypt_state(blob, None)


def test_malformed_blobs_are_refused():
    key = new_transport_key()
    blob = encrypt_state(os.urandom(64), key)
    with pytest.raises(FormatError):
        parse_state(blob[:-1])  # truncated: length differs from the header
    with pytest.raises(FormatError):
        parse_state(b"\x02\x01")
    with pytest.raises(FormatError):
        parse_state(os.urandom(200))
    mig = bytearray(blob)
    mig[5] |= st.FLAG_MIGRATION_DATA
    with pytest.raises(UnsupportedError):
        parse_state(bytes(mig))
    k128 = bytearray(blob)
    k128[5] &= ~st.FLAG_ENCRYPTED_256BIT_KEY
    with pytest.raises(UnsupportedError):
        parse_state(bytes(k128))
    with pytest.raises(IntegrityError):  # an unencrypted blob where a key is expected
        decrypt_state(plain_state(b"x" * 10), key)


def test_mutated_blobs_only_raise_typed_errors():
    """Random byte flips, truncations and extensions: a typed error or (never) a silent success."""
    import random

    from templatetool.errors import TemplateToolError

    r = random.Random(16)
    key = new_transport_key()
    good = encrypt_state(r.randbytes(500), key)
    for _ in range(400):
        bad = bytearray(good)
        op = r.randrange(3)
        if op == 0:
            for _ in range(r.randint(1, 4)):
                bad[r.randrange(len(bad))] ^= 1 << r.randrange(8)
        elif op == 1:
            del bad[r.randrange(len(bad)):]
        else:
            bad += r.randbytes(r.randint(1, 40))
        if bytes(bad) == good:
            continue
        with pytest.raises(TemplateToolError):
            decrypt_state(bytes(bad), key)


# --- against real swtpm -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vtpm():
    require_tool("swtpm", "swtpm_setup")
    require_module("tpm2_pytss")
    from templatetool.tpm.vtpm_manufacture import manufacture_vtpm

    return manufacture_vtpm(SECRET, {7: PCR7_AFTER_BOOT})


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """An unencrypted state made by swtpm_setup (test only: a real state is never in clear)."""
    require_tool("swtpm", "swtpm_setup")
    d = tmp_path_factory.mktemp("plain")
    subprocess.run(["swtpm_setup", "--tpm2", "--createek", "--create-spk", "--tpmstate", str(d), "--config",
                    "/dev/null", "--overwrite"], check=True, capture_output=True)
    return d


def _srk_name(tcti: str) -> bytes:
    from templatetool.tpm.tpmclient import open_tpm

    esys = open_tpm(tcti)
    try:
        tr = esys.tr_from_tpmpublic(0x81000001)
        return bytes(esys.tr_get_name(tr))
    finally:
        esys.close()


def _extend7(times: int):
    def prepare(tcti: str) -> None:
        import tpm2_pytss as t

        from templatetool.tpm.tpmclient import open_tpm

        esys = open_tpm(tcti)
        try:
            for _ in range(times):
                ha = t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256)
                ha.digest.sha256 = BOOT_EVENT
                esys.pcr_extend(t.ESYS_TR.PCR7, t.TPML_DIGEST_VALUES([ha]))
        finally:
            esys.close()

    return prepare


def test_swtpm_setup_state_decrypts_and_reencrypts_byte_exact(vtpm):
    b = parse_state(vtpm.state)
    assert b.version == 2 and b.flags == st.FLAG_ENCRYPTED | st.FLAG_ENCRYPTED_256BIT_KEY
    assert [t for t, _ in b.tlvs] == [st.TAG_ENCRYPTED_DATA, st.TAG_HMAC, st.TAG_IVEC_ENCRYPTED_DATA]
    plain = decrypt_state(vtpm.state, vtpm.key)
    # our encryption with swtpm's IV reproduces swtpm's file to the byte: header, TLV order,
    # key-length padding, HMAC over ciphertext || IV
    assert encrypt_state(plain, vtpm.key, b.tlv(st.TAG_IVEC_ENCRYPTED_DATA)) == vtpm.state


def test_plaintext_state_roundtrips_byte_exact(plain_dir):
    raw = (plain_dir / "tpm2-00.permall").read_bytes()
    assert not parse_state(raw).encrypted
    assert plain_state(decrypt_state(raw, None)) == raw


def test_swtpm_starts_on_a_state_we_encrypted(plain_dir, tmp_path):
    require_module("tpm2_pytss")
    from templatetool.tpm.swtpm import Swtpm
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    copy = tmp_path / "p"
    shutil.copytree(plain_dir, copy)
    with Swtpm(copy) as sw:
        want = _srk_name(sw.tcti)
    raw = (plain_dir / "tpm2-00.permall").read_bytes()
    key = new_transport_key()
    enc = rekey_state(raw, None, key)
    with start_vtpm(enc, key) as sw:
        assert _srk_name(sw.tcti) == want
    with pytest.raises(IntegrityError):
        with start_vtpm(enc, new_transport_key()):
            pass


def test_swtpm_refuses_wrong_key_and_tampered_state(vtpm):
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    with pytest.raises(IntegrityError):
        with start_vtpm(vtpm.state, new_transport_key()):
            pass
    bad = bytearray(vtpm.state)
    bad[100] ^= 0x40  # inside the ciphertext
    with pytest.raises(IntegrityError):
        with start_vtpm(bytes(bad), vtpm.key):
            pass


def test_rekeyed_state_opens_with_new_key_only(vtpm):
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    k2 = new_transport_key()
    re = rekey_state(vtpm.state, vtpm.key, k2)
    assert re != vtpm.state
    with start_vtpm(re, k2) as sw:
        assert _srk_name(sw.tcti) == vtpm.srk.name
    with pytest.raises(IntegrityError):
        with start_vtpm(re, vtpm.key):
            pass


def test_manufactured_publics_are_the_vtpm_keys(vtpm, tmp_path):
    """tpm2-tools (independent of our tpm2-pytss reader) reads the same SRK and EK publics."""
    require_tool("tpm2_readpublic")
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    assert not vtpm.srk.is_ek_style and vtpm.ek.is_ek_style
    with start_vtpm(vtpm.state, vtpm.key) as sw:
        for handle, want in (("0x81000001", vtpm.srk), ("0x81010001", vtpm.ek)):
            out = tmp_path / f"{handle}.pub"
            subprocess.run(["tpm2_readpublic", "-T", sw.tcti, "-c", handle, "-o", str(out)], check=True,
                           capture_output=True)
            assert out.read_bytes() == want.tpm2b_public
    assert vtpm.key not in repr(vtpm).encode() and vtpm.key.hex() not in str(vtpm.to_json())


def test_unseal_inside_the_vtpm_right_pcrs(vtpm):
    from templatetool.tpm.protector import parse_protector
    from templatetool.tpm.vtpm_manufacture import unseal_in_vtpm

    prot = parse_protector(vtpm.protector)
    assert prot.parent_name == vtpm.srk.name and prot.pcrs == (7,)
    assert unseal_in_vtpm(vtpm.state, vtpm.key, vtpm.protector, prepare=_extend7(1)) == SECRET


def test_unseal_refused_after_one_more_pcr7_extend(vtpm):
    from templatetool.tpm.vtpm_manufacture import unseal_in_vtpm

    with pytest.raises(PolicyError):
        unseal_in_vtpm(vtpm.state, vtpm.key, vtpm.protector, prepare=_extend7(2))
    with pytest.raises(PolicyError):  # no boot measurement at all
        unseal_in_vtpm(vtpm.state, vtpm.key, vtpm.protector)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_manufacture_rekey_state(tmp_path):
    require_tool("swtpm", "swtpm_setup")
    require_module("tpm2_pytss")
    from templatetool.tpm.vtpm_manufacture import unseal_in_vtpm

    (tmp_path / "s.bin").write_bytes(SECRET)
    st_, k, p = tmp_path / "vm.state", tmp_path / "k.bin", tmp_path / "p.bin"
    cp = run_cli("vtpm", "manufacture", "-o", str(st_), "--key-out", str(k), "--secret-file", str(tmp_path / "s.bin"),
                 "--pcrs", "7", "--pcr-values", f"7={PCR7_AFTER_BOOT.hex()}", "--protector-out", str(p), "--json",
                 check=True)
    assert stat.S_IMODE(k.stat().st_mode) == 0o600 and len(k.read_bytes()) == 32
    key = k.read_bytes()
    for text in (cp.stdout, cp.stderr):  # K in no output form
        assert key.hex() not in text.lower() and base64.b64encode(key).decode() not in text
    assert key not in st_.read_bytes() and key not in p.read_bytes()
    assert unseal_in_vtpm(st_.read_bytes(), k.read_bytes(), p.read_bytes(), prepare=_extend7(1)) == SECRET
    before = st_.read_bytes()
    k2, st2 = tmp_path / "k2.bin", tmp_path / "vm2.state"
    run_cli("vtpm", "rekey", str(st_), "--key", str(k), "--new-key-out", str(k2), "-o", str(st2), check=True)
    assert st_.read_bytes() == before  # input untouched
    assert stat.S_IMODE(k2.stat().st_mode) == 0o600
    assert decrypt_state(st2.read_bytes(), k2.read_bytes()) == decrypt_state(before, k.read_bytes())
    cp = run_cli("vtpm", "state", str(st2), "--key", str(k2), "--json", check=True)
    assert '"verified": true' in cp.stdout


def test_cli_bad_input_clean_errors(tmp_path):
    key, other = new_transport_key(), new_transport_key()
    stf, k, k2 = tmp_path / "vm.state", tmp_path / "k.bin", tmp_path / "k2.bin"
    stf.write_bytes(encrypt_state(os.urandom(300), key))
    k.write_bytes(key)
    k2.write_bytes(other)
    (tmp_path / "s.bin").write_bytes(SECRET)
    # wrong key: integrity error, one line, exit 4; not a state: format error, exit 3
    assert_clean_error(run_cli("vtpm", "state", str(stf), "--key", str(k2)), 4)
    assert_clean_error(run_cli("vtpm", "state", str(tmp_path / "s.bin")), 3)
    # outputs (keys) are never overwritten; a key file must be 32 bytes; sealing needs PCR values
    assert_clean_error(run_cli("vtpm", "rekey", str(stf), "--key", str(k), "--new-key-out", str(k2), "-o",
                               str(tmp_path / "x")), 2)
    assert_clean_error(run_cli("vtpm", "rekey", str(stf), "--key", str(tmp_path / "s.bin"), "--new-key-out",
                               str(tmp_path / "k3"), "-o", str(tmp_path / "z")), 2)
    assert_clean_error(run_cli("vtpm", "manufacture", "-o", str(tmp_path / "y"), "--key-out", str(tmp_path / "yk"),
                               "--secret-file", str(tmp_path / "s.bin"), "--protector-out", str(tmp_path / "yp")), 2)
    assert not (tmp_path / "x").exists() and not (tmp_path / "yk").exists() and k2.read_bytes() == other


def test_swtpm_start_waits_for_initialisation(vtpm, tmp_path):
    """Regression: Swtpm.start() returned as soon as swtpm accepted a TCP connection, but swtpm
    listens before it loads its state, so a swtpm about to die on a wrong key looked started.
    Now start() waits for the control channel (answered only after libtpms initialised)."""
    from templatetool.tpm.swtpm import Swtpm

    for i in range(5):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "tpm2-00.permall").write_bytes(vtpm.state)
        with pytest.raises(IntegrityError):
            Swtpm(d, key=new_transport_key()).start()


def test_swtpm_pads_to_key_length_not_aes_block(tmp_path):
    """A state whose size makes the two rules differ (pad > 16): swtpm pads to the 32-byte key
    length; our re-encryption reproduces its file, and swtpm starts on our encryption of it."""
    require_tool("swtpm", "swtpm_setup")
    require_module("tpm2_pytss")
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    key = new_transport_key()
    d = tmp_path / "spk"
    d.mkdir(mode=0o700)
    r, w = os.pipe()
    os.write(w, key.hex().encode())
    os.close(w)
    try:
        subprocess.run(["swtpm_setup", "--tpm2", "--create-spk", "--tpmstate", str(d), "--config", "/dev/null",
                        "--overwrite", "--keyfile-fd", str(r), "--cipher", "aes-256-cbc"], check=True,
                       capture_output=True, pass_fds=(r,))
    finally:
        os.close(r)
    raw = (d / "tpm2-00.permall").read_bytes()
    plain = decrypt_state(raw, key)
    ct = parse_state(raw).tlv(st.TAG_ENCRYPTED_DATA)
    pad = len(ct) - len(plain)
    assert pad > 16, f"state size {len(plain)} does not tell the rules apart (pad {pad})"
    assert encrypt_state(plain, key, parse_state(raw).tlv(st.TAG_IVEC_ENCRYPTED_DATA)) == raw
    k2 = new_transport_key()
    with start_vtpm(encrypt_state(plain, k2), k2) as sw:
        assert len(_srk_name(sw.tcti)) == 34


def test_state_changes_persist_encrypted_under_the_same_key(vtpm):
    """What the TPM stores while it runs (here an NV index) is in ``final_state``, still
    encrypted under K, and there after a restart; the original state does not have it."""
    import tpm2_pytss as t

    from templatetool.tpm.tpmclient import open_tpm
    from templatetool.tpm.vtpm_manufacture import start_vtpm

    nv = 0x01500016
    with start_vtpm(vtpm.state, vtpm.key) as run:
        esys = open_tpm(run.tcti)
        try:
            pub = t.TPM2B_NV_PUBLIC(t.TPMS_NV_PUBLIC(
                nvIndex=nv, nameAlg=t.TPM2_ALG.SHA256, dataSize=8,
                attributes=t.TPMA_NV.OWNERWRITE | t.TPMA_NV.OWNERREAD | t.TPMA_NV.AUTHREAD | t.TPMA_NV.AUTHWRITE))
            esys.nv_define_space(t.TPM2B_AUTH(), pub)
        finally:
            esys.close()
    after = run.final_state
    assert after is not None and after != vtpm.state
    assert decrypt_state(after, vtpm.key) != decrypt_state(vtpm.state, vtpm.key)

    def has_index(state: bytes) -> bool:
        with start_vtpm(state, vtpm.key) as r:
            esys = open_tpm(r.tcti)
            try:
                esys.tr_from_tpmpublic(nv)
                return True
            except t.TSS2_Exception:
                return False
            finally:
                esys.close()

    assert has_index(after) and not has_index(vtpm.state)


def test_manufacture_refuses_bad_input_before_swtpm(monkeypatch):
    from templatetool.errors import UsageError
    from templatetool.tpm import vtpm_manufacture as vm

    def boom(*a, **k):  # swtpm_setup must not even run
        raise AssertionError("swtpm_setup ran")

    monkeypatch.setattr(vm, "_setup_argv", boom)
    for args, kw in (((b"x" * 129, {7: bytes(32)}), {}), ((b"x", {7: bytes(20)}), {}), ((b"x", None), {}),
                     ((None, {7: bytes(32)}), {}), ((None, None), {"key": b"short"})):
        with pytest.raises(UsageError):
            vm.manufacture_vtpm(*args, **kw)


def test_cli_manufacture_with_tcg_log_seals_to_the_replayed_boot(tmp_path):
    """--tcg-log (default PCRs 7,11): a boot that extends the logged digests unseals; a boot
    missing the PCR 11 event does not."""
    require_tool("swtpm", "swtpm_setup")
    require_module("tpm2_pytss")
    import tpm2_pytss as t

    from templatetool.tpm import structs as s
    from templatetool.tpm.eventlog import write_agile_log
    from templatetool.tpm.tpmclient import open_tpm
    from templatetool.tpm.vtpm_manufacture import unseal_in_vtpm

    ev11 = hashlib.sha256(b"templatetool test pcr 11").digest()
    log = write_agile_log([(7, 0x80000001, {s.ALG_SHA256: BOOT_EVENT}, b"a"),
                           (11, 0x0D, {s.ALG_SHA256: ev11}, b"b")], banks={s.ALG_SHA256: 32})
    (tmp_path / "boot.log").write_bytes(log)
    (tmp_path / "s.bin").write_bytes(SECRET)
    stf, k, p = tmp_path / "st", tmp_path / "k", tmp_path / "p"
    run_cli("vtpm", "manufacture", "-o", str(stf), "--key-out", str(k), "--secret-file", str(tmp_path / "s.bin"),
            "--tcg-log", str(tmp_path / "boot.log"), "--protector-out", str(p), check=True)

    def boot(events):
        def prepare(tcti):
            esys = open_tpm(tcti)
            try:
                for pcr, d in events:
                    ha = t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256)
                    ha.digest.sha256 = d
                    esys.pcr_extend(getattr(t.ESYS_TR, f"PCR{pcr}"), t.TPML_DIGEST_VALUES([ha]))
            finally:
                esys.close()
        return prepare

    state, key, prot = stf.read_bytes(), k.read_bytes(), p.read_bytes()
    assert unseal_in_vtpm(state, key, prot, prepare=boot([(7, BOOT_EVENT), (11, ev11)])) == SECRET
    with pytest.raises(PolicyError):
        unseal_in_vtpm(state, key, prot, prepare=boot([(7, BOOT_EVENT)]))
