"""The systemd-tpm2 LUKS2 token, sealed in a swtpm, judged by systemd 252's own token plugin
(libcryptsetup-token-systemd-tpm2.so) and compared field by field with systemd-cryptenroll's
enrolment on the same TPM."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from templatetool.errors import IntegrityError
from templatetool.luks import KdfParams, KeyslotSpec, encrypt_image, read_header
from templatetool.luks.tpm2 import SEALED_ATTRIBUTES, token_keyslot, tokens_of, unseal_token

from .conftest import IN_CI, require_module, require_tool

PW = b"template passphrase"
PLUGIN = Path("/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so")


class _PluginParams(ctypes.Structure):
    """systemd's ``systemd_tpm2_plugin_params`` (252: mask, device, signature path; later versions
    append pcrlock_path, harmless as a NULL here)."""

    _fields_ = [("search_pcr_mask", ctypes.c_uint32), ("device", ctypes.c_char_p),
                ("signature_path", ctypes.c_char_p), ("pcrlock_path", ctypes.c_char_p)]


def stock_plugin_unlocks(img: Path, tcti: str) -> int:
    """What systemd-cryptsetup does with ``tpm2-device=TCTI``: libcryptsetup runs the systemd-tpm2
    token plugin with the device in its params; name NULL = check only (no device-mapper).
    Returns the keyslot opened, or a negative errno."""
    lib = ctypes.CDLL(ctypes.util.find_library("cryptsetup") or "libcryptsetup.so.12")
    cd = ctypes.c_void_p()
    assert lib.crypt_init(ctypes.byref(cd), str(img).encode()) == 0
    try:
        assert lib.crypt_load(cd, b"LUKS2", None) == 0
        params = _PluginParams(0xFFFFFFFF, tcti.encode(), None, None)
        rc: int = lib.crypt_activate_by_token_pin(cd, None, b"systemd-tpm2", -1, None, ctypes.c_size_t(0),
                                                  ctypes.byref(params), 0)
        return rc
    finally:
        lib.crypt_free(cd)
        flush_sessions(tcti)


def flush_sessions(tcti: str) -> None:
    """systemd 252 leaves one session loaded per run, and its primary and sealed object after a
    refused unseal (the kernel's /dev/tpmrm0 resource manager flushes them when the process
    closes the device); a raw swtpm socket has no resource manager, so do what it would, or the
    swtpm runs out of its 3 session / 3 object slots."""
    for what in ("--loaded-session", "--transient-object"):
        subprocess.run(["tpm2_flushcontext", "-T", tcti, what], check=True, capture_output=True)


@pytest.fixture
def swtpm(tmp_path: Path) -> Any:
    require_tool("swtpm", "cryptsetup", "tpm2_flushcontext")
    require_module("tpm2_pytss")
    if not PLUGIN.exists():
        msg = "needs systemd's cryptsetup token plugin (Debian: libcryptsetup12 + systemd's libcryptsetup-token-systemd-tpm2)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    from templatetool.tpm.swtpm import Swtpm

    with Swtpm(tmp_path / "tpm") as tpm:
        _extend(tpm.tcti, 7, b"firmware")  # a fresh swtpm's PCR 7 is all zeros: make it look booted
        yield tpm


def _extend(tcti: str, pcr: int, data: bytes) -> None:
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TCTILdr

    ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
    ha.digest.sha256 = hashlib.sha256(data).digest()
    with ESAPI(TCTILdr.parse(tcti)) as e:
        e.pcr_extend(ESYS_TR.PCR0 + pcr, TPML_DIGEST_VALUES([ha]))


def _image(tmp_path: Path, tcti: str) -> tuple[Path, bytes]:
    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "root.luks"
    encrypt_image(src, out, [KeyslotSpec(PW, KdfParams("pbkdf2", iterations=1000)), token_keyslot(tcti, [7])])
    return out, src.read_bytes()


def test_stock_systemd_plugin_unlocks_our_token(tmp_path: Path, swtpm: Any) -> None:
    img, _ = _image(tmp_path, swtpm.tcti)
    assert stock_plugin_unlocks(img, swtpm.tcti) == 1  # keyslot 1: the token's
    # cryptsetup's dump goes through the plugin's validate/dump too
    dump = subprocess.run(["cryptsetup", "luksDump", str(img)], capture_output=True, text=True, check=True).stdout
    assert "0: systemd-tpm2" in dump and "tpm2-hash-pcrs:   7" in dump and "tpm2-primary-alg: ecc" in dump
    # one more PCR 7 extend: the plugin refuses (policy digest no longer matches)
    _extend(swtpm.tcti, 7, b"one more")
    assert stock_plugin_unlocks(img, swtpm.tcti) < 0
    with open(img, "rb") as f:
        (_, tok), = tokens_of(read_header(f).metadata)
    with pytest.raises(IntegrityError):
        unseal_token(swtpm.tcti, tok)


def test_our_unseal_gives_the_keyslot_passphrase(tmp_path: Path, swtpm: Any) -> None:
    img, _ = _image(tmp_path, swtpm.tcti)
    with open(img, "rb") as f:
        (_, tok), = tokens_of(read_header(f).metadata)
    pw = unseal_token(swtpm.tcti, tok)
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-slot", "1", "--key-file", "-", str(img)],
                       input=pw, capture_output=True)
    assert r.returncode == 0, r.stderr


def test_token_matches_systemd_cryptenroll_field_by_field(tmp_path: Path, swtpm: Any) -> None:
    require_tool("systemd-cryptenroll")
    from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC

    ours, _ = _image(tmp_path, swtpm.tcti)
    theirs = tmp_path / "theirs.img"
    theirs.write_bytes(bytes(20 << 20))
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", str(theirs)], input=PW, check=True,
                   capture_output=True)
    r = subprocess.run(["systemd-cryptenroll", f"--tpm2-device={swtpm.tcti}", "--tpm2-pcrs=7", str(theirs)],
                       env=dict(os.environ, PASSWORD=PW.decode()), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    flush_sessions(swtpm.tcti)

    def token(p: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        meta = json.loads(subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(p)],
                                         capture_output=True, check=True).stdout)
        (_, t), = tokens_of(meta)
        return t, meta["keyslots"][t["keyslots"][0]]

    (a, ka), (b, kb) = token(ours), token(theirs)
    assert set(a) == set(b)
    for k in ("type", "tpm2-pcrs", "tpm2-pcr-bank", "tpm2-primary-alg", "tpm2-policy-hash", "tpm2-pin"):
        assert a[k] == b[k], k
    assert (ka["kdf"]["type"], ka["af"]["hash"]) == (kb["kdf"]["type"], kb["af"]["hash"])
    pubs = []
    for t in (a, b):
        raw = __import__("base64").b64decode(t["tpm2-blob"])
        _, n = TPM2B_PRIVATE.unmarshal(raw)
        pubs.append(TPM2B_PUBLIC.unmarshal(raw[n:])[0].publicArea)
    assert int(pubs[0].objectAttributes) == int(pubs[1].objectAttributes) == SEALED_ATTRIBUTES
    assert (pubs[0].type, pubs[0].nameAlg) == (pubs[1].type, pubs[1].nameAlg)
    # and each side's blob loads under the other's primary: systemd's plugin opens both images
    assert stock_plugin_unlocks(theirs, swtpm.tcti) == 1
    assert stock_plugin_unlocks(ours, swtpm.tcti) == 1


def test_enroll_tpm2_into_an_existing_volume(tmp_path: Path, swtpm: Any) -> None:
    """`luks enroll-tpm2` (our systemd-cryptenroll): the passphrase keyslot keeps working, the
    stock plugin opens the new one, the data is unchanged, and the input is untouched."""
    from .conftest import run_cli

    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(1 << 20))
    one = tmp_path / "one.luks"
    encrypt_image(src, one, [KeyslotSpec(PW, KdfParams("pbkdf2", iterations=1000))])
    before = one.read_bytes()
    two = tmp_path / "two.luks"
    run_cli("luks", "enroll-tpm2", str(one), "-o", str(two), "--passphrase-env", "PW", "--tpm2-device", swtpm.tcti,
            env={"PW": PW.decode()}, check=True)
    assert one.read_bytes() == before
    assert two.read_bytes()[16 << 20:] == before[16 << 20:]
    assert stock_plugin_unlocks(two, swtpm.tcti) == 1
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-slot", "0", "--key-file", "-", str(two)],
                       input=PW, capture_output=True)
    assert r.returncode == 0, r.stderr
    with open(two, "rb") as f:
        h = read_header(f)
    assert h.seqid == 2 and h.metadata["digests"]["0"]["keyslots"] == ["0", "1"]
    back = tmp_path / "back.img"
    run_cli("luks", "decrypt", str(two), "-o", str(back), "--tpm2-device", swtpm.tcti, check=True)
    assert back.read_bytes() == src.read_bytes()


def test_seal_to_predicted_pcrs(tmp_path: Path, swtpm: Any) -> None:
    """Sealed to PCR values computed offline (what the VM's boot will measure): the stock plugin
    refuses now and opens once the TPM reaches them."""
    from tpm2_pytss import ESAPI, TPML_PCR_SELECTION, TCTILdr

    from .conftest import run_cli

    with ESAPI(TCTILdr.parse(swtpm.tcti)) as e:
        now = bytes(e.pcr_read(TPML_PCR_SELECTION.parse("sha256:7"))[2][0])
    predicted = hashlib.sha256(now + hashlib.sha256(b"uki").digest()).digest()
    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(64 << 10))
    out = tmp_path / "root.luks"
    run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "PW", "--pbkdf", "pbkdf2",
            "--pbkdf-iterations", "1000", "--tpm2-device", swtpm.tcti, "--tpm2-pcr-values", f"7={predicted.hex()}",
            env={"PW": "pw"}, check=True)
    assert stock_plugin_unlocks(out, swtpm.tcti) < 0
    _extend(swtpm.tcti, 7, b"uki")
    assert stock_plugin_unlocks(out, swtpm.tcti) == 1
