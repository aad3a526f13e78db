"""`templatetool encrypt --tpm-parent ...` and `templatetool decrypt --tpm TCTI` (issue 13 item 3).

Judges: swtpm (libtpms, through the CLI's tpm2-pytss TCTI) enforces the PCR policy and the PIN
and counts a wrong PIN in its dictionary-attack counter; dislocker-file opens the same volume
with the recovery password and must give the same plaintext bytes as our `decrypt --tpm`; ntfscat
reads the files back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from .conftest import assert_clean_error, require_module, require_tool, run_cli
from .test_bitlocker_common import dislocker_decrypt, expected_hashes, make_ntfs, ntfs_file_hashes

os.environ.setdefault("TSS2_LOG", "all+NONE")

SRK_HANDLE = 0x81000001
EK_HANDLE = 0x81010001
EV = hashlib.sha256(b"secure boot db").digest()
#: PCR 7 after the reference boot measured EV once; PCR 11 left at its reset value.
BOOTED = {7: hashlib.sha256(bytes(32) + EV).digest(), 11: bytes(32)}


@pytest.fixture
def swtpm(tmp_path: Path):
    require_tool("swtpm")
    require_module("tpm2_pytss")
    from templatetool.tpm.swtpm import Swtpm

    with Swtpm(tmp_path / "state") as sw:
        yield sw


def _esys(sw):
    import tpm2_pytss as t

    return t.ESAPI(sw.tcti_loader())


def _extend7(sw) -> None:
    """One measurement into PCR 7 (sha256 bank), as the VM's firmware would do."""
    import tpm2_pytss as t

    esys = _esys(sw)  # swtpm serves one client at a time: open, extend, close
    try:
        ha = t.TPMT_HA(hashAlg=t.TPM2_ALG.SHA256)
        ha.digest.sha256 = EV
        esys.pcr_extend(t.ESYS_TR.PCR7, t.TPML_DIGEST_VALUES([ha]))
    finally:
        esys.close()


def _srk_pub(sw, out: Path) -> Path:
    """Create the standard RSA SRK, persist it at 0x81000001 and write its TPM2B_PUBLIC."""
    import tpm2_pytss as t

    from templatetool.tpm import keys

    esys = _esys(sw)
    try:
        tmpl = t.TPM2B_PUBLIC.parse("rsa2048:aes128cfb", objectAttributes=keys.SRK_ATTRIBUTES)
        h, pub, *_ = esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, t.ESYS_TR.OWNER)
        esys.evict_control(t.ESYS_TR.OWNER, h, SRK_HANDLE)
        esys.flush_context(h)
    finally:
        esys.close()
    out.write_bytes(pub.marshal())
    return out


def _ek_pub(sw, out: Path) -> Path:
    """Create the TCG default RSA EK (tpm2-pytss's template), persist it at 0x81010001 and write
    its TPM2B_PUBLIC (what `tpm2_readpublic -c 0x81010001 -o ek.pub` gives)."""
    import tpm2_pytss as t
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template

    def nv_read(index):
        raise NoSuchIndex(index)

    esys = _esys(sw)
    try:
        _, tmpl = create_ek_template("EK-RSA2048", nv_read)
        h, pub, *_ = esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, t.ESYS_TR.ENDORSEMENT)
        esys.evict_control(t.ESYS_TR.OWNER, h, EK_HANDLE)
        esys.flush_context(h)
    finally:
        esys.close()
    out.write_bytes(pub.marshal())
    return out


def _lockout_counter(sw) -> int:
    from templatetool.tpm.tpmclient import lockout_counter

    esys = _esys(sw)
    try:
        return lockout_counter(esys)
    finally:
        esys.close()


def _same_as_dislocker(enc: Path, ours: Path, dl: Path) -> int:
    """Our `decrypt --tpm` output equals dislocker's (recovery password) plaintext wherever the
    encrypted volume holds ciphertext; in the chunks a sparse encrypt never wrote (free NTFS
    space, all-zero ciphertext) ours holds zeros and dislocker decrypts the zeros to noise.
    Returns the number of bytes compared equal."""
    blk = 4096
    equal = 0
    with open(enc, "rb") as fe, open(ours, "rb") as fo, open(dl, "rb") as fd:
        assert os.path.getsize(ours) == os.path.getsize(dl) == os.path.getsize(enc)
        while True:
            c, o, d = fe.read(blk), fo.read(blk), fd.read(blk)
            if not c:
                return equal
            if c.count(0) == len(c):
                assert o.count(0) == len(o), f"non-zero plaintext in a never-written chunk @{fo.tell() - blk:#x}"
            else:
                assert o == d, f"plaintext differs from dislocker's @{fo.tell() - blk:#x}"
                equal += len(o)


def _vtpm_args(doc: dict) -> list[dict]:
    return [p for p in doc["protectors"] if p["type"] == "tpm"]


def test_srk_parent_right_pcrs_open_one_more_extend_refused(tmp_path: Path, swtpm) -> None:
    """Sealed to the SRK with --pcrs/--pcr-values: refused before the reference boot (exit 6),
    opens after it (bytes equal to dislocker's with the recovery password), refused again after
    one more extend (exit 6, no output)."""
    vol = make_ntfs(tmp_path / "vol.img", 8)
    srk = _srk_pub(swtpm, tmp_path / "srk.pub")
    enc, rpf = tmp_path / "enc.img", tmp_path / "rp.txt"
    values = ",".join(f"{i}={v.hex()}" for i, v in BOOTED.items())
    cp = run_cli("encrypt", str(vol), "-o", str(enc), "--tpm-parent", str(srk), "--pcrs", "7,11",
                 "--pcr-values", values, "--recovery-password-out", str(rpf), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert len(_vtpm_args(doc)) == 1 and {p["type"] for p in doc["protectors"]} == {"tpm", "recovery-password"}
    assert doc["vtpm"]["pcrs"] == [7, 11] and doc["vtpm"]["bank"] == "sha256" and doc["vtpm"]["pin"] is False

    dec = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti)
    assert_clean_error(cp, 6)  # the VM has not booted the reference chain yet
    assert "PCR" in cp.stderr and not dec.exists()

    _extend7(swtpm)
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti, "--json")
    assert cp.returncode == 0, cp.stderr
    assert ntfs_file_hashes(dec) == expected_hashes()
    dl = dislocker_decrypt(enc, tmp_path / "dl.img", recovery_password=rpf.read_text().strip())
    assert ntfs_file_hashes(dl) == expected_hashes()
    assert _same_as_dislocker(enc, dec, dl) > 1 << 20

    _extend7(swtpm)  # one more measurement: the boot chain changed
    dec2 = tmp_path / "dec2.img"
    cp = run_cli("decrypt", str(enc), "-o", str(dec2), "--tpm", swtpm.tcti)
    assert_clean_error(cp, 6)
    assert "policy error" in cp.stderr and not dec2.exists()


def test_ek_parent_tcg_log_pin_wrong_refused_and_counted(tmp_path: Path, swtpm) -> None:
    """Sealed to the EK with --tcg-log (default PCRs 7,11) and --pin-env: no PIN and a wrong PIN
    are refused (exit 5), the wrong one is counted by the TPM and reported; the right PIN opens
    (bytes equal to dislocker's with the recovery password)."""
    from templatetool.tpm import structs as s
    from templatetool.tpm.eventlog import write_agile_log

    vol = make_ntfs(tmp_path / "vol.img", 8)
    ek = _ek_pub(swtpm, tmp_path / "ek.pub")
    log = tmp_path / "boot.log"
    log.write_bytes(write_agile_log([(7, 0x800000E0, {s.ALG_SHA256: EV}, b"db")], {s.ALG_SHA256: 32}))
    enc = tmp_path / "enc.img"
    cp = run_cli("encrypt", str(vol), "-o", str(enc), "--tpm-parent", str(ek), "--tcg-log", str(log),
                 "--pin-env", "TT_PIN", "--show-recovery-password", "--json", env={"TT_PIN": "246810"})
    assert cp.returncode == 0, cp.stderr
    assert "246810" not in cp.stdout + cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["vtpm"]["pcrs"] == [7, 11] and doc["vtpm"]["pin"] is True
    rp = doc["recovery_password"]
    _extend7(swtpm)

    dec = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti)
    assert_clean_error(cp, 5)
    assert "needs a PIN" in cp.stderr and not dec.exists()

    before = _lockout_counter(swtpm)
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti, "--pin-env", "TT_PIN",
                 env={"TT_PIN": "135790"})
    assert_clean_error(cp, 5)
    assert "wrong PIN" in cp.stderr and not dec.exists()
    assert _lockout_counter(swtpm) == before + 1
    assert f"counted it: {before + 1} of " in cp.stderr  # the DA state is reported to the user

    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti, "--pin-env", "TT_PIN",
                 env={"TT_PIN": "246810"})
    assert cp.returncode == 0, cp.stderr
    assert ntfs_file_hashes(dec) == expected_hashes()
    dl = dislocker_decrypt(enc, tmp_path / "dl.img", recovery_password=rp)
    assert ntfs_file_hashes(dl) == expected_hashes()
    assert _same_as_dislocker(enc, dec, dl) > 1 << 20


def test_pin_guessing_ends_in_reported_lockout(tmp_path: Path, swtpm) -> None:
    """Wrong PINs count up to the TPM's limit; the last is reported as the start of lockout, and
    then even the right PIN is refused with a lockout error (exit 5), never a traceback."""
    vol = make_ntfs(tmp_path / "vol.img", 8)
    srk = _srk_pub(swtpm, tmp_path / "srk.pub")
    enc, dec = tmp_path / "enc.img", tmp_path / "dec.img"
    cp = run_cli("encrypt", str(vol), "-o", str(enc), "--tpm-parent", str(srk), "--pcrs", "11",
                 "--pcr-values", f"11={'00' * 32}", "--pin-env", "TT_PIN", "--show-recovery-password",
                 env={"TT_PIN": "2468"})
    assert cp.returncode == 0, cp.stderr
    msgs = []
    for _ in range(10):
        cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti, "--pin-env", "TT_PIN",
                     env={"TT_PIN": "0000"})
        assert_clean_error(cp, 5)
        msgs.append(cp.stderr)
        if "now in dictionary-attack lockout" in cp.stderr:
            break
    else:
        pytest.fail("no lockout after 10 wrong PINs: " + msgs[-1])
    assert all("wrong PIN" in m for m in msgs) and f"counted it ({len(msgs)} of {len(msgs)})" in msgs[-1]
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--tpm", swtpm.tcti, "--pin-env", "TT_PIN",
                 env={"TT_PIN": "2468"})
    assert_clean_error(cp, 5)
    assert "dictionary-attack lockout" in cp.stderr and not dec.exists()


def test_option_validation_is_clean_usage_error(tmp_path: Path) -> None:
    """PCR indices, bank and option combinations are checked at the options: exit 2, one
    `templatetool: usage error:` line naming the problem (before: "No such option")."""
    from templatetool.tpm import keys

    vol = make_ntfs(tmp_path / "vol.img", 8)
    key = keys.generate_storage_key("ecc")
    (tmp_path / "p.pub").write_bytes(keys.parse_parent_public(keys.template_public(key.public_key())).tpm2b_public)
    out = tmp_path / "out.img"
    base = ["encrypt", str(vol), "-o", str(out), "--tpm-parent", str(tmp_path / "p.pub"), "--show-recovery-password"]
    z = "00" * 32
    cases = [
        (base + ["--pcrs", "7,24", "--pcr-values", f"7={z}"], "PCR index 24 out of range (--pcrs)"),
        (base + ["--pcrs", "7,x", "--pcr-values", f"7={z}"], "bad PCR list"),
        (base + ["--bank", "md5", "--pcr-values", f"7={z}"], "unknown PCR bank 'md5' (--bank)"),
        (base + ["--pcrs", "7"], "give --pcr-values or --tcg-log"),
        (base + ["--pcr-values", f"7={z}", "--tcg-log", str(vol)], "exclusive"),
        (base[:-1] + ["--pcr-values", f"7={z}"], "a vTPM protector alone"),
        (["encrypt", str(vol), "-o", str(out), "--show-recovery-password", "--pcr-values", f"7={z}"],
         "need --tpm-parent"),
        (["encrypt", str(vol), "-o", str(out), "--show-recovery-password", "--tpm-parent-template", "ek"],
         "need --tpm-parent"),
        (["encrypt", str(vol), "-o", str(out), "--show-recovery-password", "--bank", "sha1"], "need --tpm-parent"),
        (["decrypt", str(vol), "-o", str(out), "--recovery-password-env", "X", "--pin-env", "P"],
         "it needs --tpm TCTI"),
        (["decrypt", str(vol), "-o", str(out), "--tpm", "swtpm:port=1", "--clear-key"], "exactly one credential"),
    ]
    for args, msg in cases:
        cp = run_cli(*args)
        assert_clean_error(cp, 2)
        assert cp.stderr.startswith("templatetool: usage error:") and msg in cp.stderr, (args, cp.stderr)
        assert not out.exists()


def test_decrypt_tpm_without_tpm_protector(tmp_path: Path) -> None:
    """`decrypt --tpm` of a volume that has no vTPM protector: credential error (exit 5) before
    any TPM is contacted."""
    vol = make_ntfs(tmp_path / "vol.img", 8)
    enc, out = tmp_path / "enc.img", tmp_path / "out.img"
    assert run_cli("encrypt", str(vol), "-o", str(enc), "--show-recovery-password").returncode == 0
    cp = run_cli("decrypt", str(enc), "-o", str(out), "--tpm", "swtpm:host=127.0.0.1,port=1")
    assert_clean_error(cp, 5)
    assert "no TPM protector" in cp.stderr and not out.exists()


def test_in_place_with_vtpm_protector(tmp_path: Path, swtpm) -> None:
    """`encrypt --in-place --tpm-parent` converts a reserved volume with the vTPM protector;
    `decrypt --tpm` opens it (files read back by ntfscat), dislocker with the recovery password."""
    from templatetool.bitlocker.reserve import reserve_ntfs

    vol = make_ntfs(tmp_path / "vol.img", 8)
    reserve_ntfs(vol)
    srk = _srk_pub(swtpm, tmp_path / "srk.pub")
    rpf, dec = tmp_path / "rp.txt", tmp_path / "dec.img"
    cp = run_cli("encrypt", str(vol), "--in-place", "--tpm-parent", str(srk), "--pcrs", "11",
                 "--pcr-values", f"11={'00' * 32}", "--recovery-password-out", str(rpf), "--json")
    assert cp.returncode == 0, cp.stderr
    assert {p["type"] for p in json.loads(cp.stdout)["result"]["protectors"]} == {"tpm", "recovery-password"}
    cp = run_cli("decrypt", str(vol), "-o", str(dec), "--tpm", swtpm.tcti)
    assert cp.returncode == 0, cp.stderr
    assert ntfs_file_hashes(dec) == expected_hashes()
    dl = dislocker_decrypt(vol, tmp_path / "dl.img", recovery_password=rpf.read_text().strip())
    assert ntfs_file_hashes(dl) == expected_hashes()
    assert _same_as_dislocker(vol, dec, dl) > 1 << 20
