"""LUKS2 written natively (templatetool.luks), judged by cryptsetup and dissect.fve, and read back
from volumes cryptsetup made."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from templatetool.errors import CredentialError, IntegrityError, UnsupportedError
from templatetool.luks import KdfParams, KeyslotSpec, decrypt_image, describe, encrypt_image, read_header
from templatetool.luks.af import af_merge, af_split, diffuse
from templatetool.luks.kdf import derive
from templatetool.luks.metadata import HDR_SIZE
from templatetool.luks.volume import build_metadata_region, open_keyslot

from .conftest import require_module, require_tool

FAST = KdfParams("pbkdf2", iterations=1000)
FAST_ARGON = KdfParams("argon2id", time=1, memory=8192, cpus=1)
PW = b"correct horse"


def _cs(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cryptsetup", *args], input=stdin, capture_output=True, timeout=120)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    p = tmp_path / "root.img"
    p.write_bytes(os.urandom(3 << 20))
    return p


# --- AF splitter -------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=1, max_size=80), stripes=st.integers(1, 12),
       hash_name=st.sampled_from(["sha1", "sha256", "sha512"]))
def test_af_split_merge_round_trip(key: bytes, stripes: int, hash_name: str) -> None:
    m = af_split(key, stripes, hash_name)
    assert len(m) == stripes * len(key)
    assert af_merge(m, len(key), stripes, hash_name) == key


@settings(max_examples=20, deadline=None)
@given(key=st.binary(min_size=16, max_size=64), stripes=st.integers(2, 8), data=st.data())
def test_af_any_damaged_stripe_loses_the_key(key: bytes, stripes: int, data: st.DataObject) -> None:
    m = bytearray(af_split(key, stripes, "sha256"))
    i = data.draw(st.integers(0, len(m) - 1))
    m[i] ^= 0x01
    assert af_merge(m, len(key), stripes, "sha256") != key


def test_af_known_answer() -> None:
    # two stripes, zero random stripe: key = s1 XOR H(s0), H(0^40) per the spec's diffuse
    import hashlib
    zero = bytes(40)
    h = hashlib.sha256(b"\0\0\0\0" + zero[:32]).digest() + hashlib.sha256(b"\0\0\0\1" + zero[32:]).digest()[:8]
    assert diffuse(zero, "sha256") == h
    key = bytes(range(40))
    m = af_split(key, 2, "sha256", rand=zero)
    assert m[40:] == bytes(a ^ b for a, b in zip(key, h, strict=True))


def test_cryptsetup_keyslot_merges_to_its_volume_key(tmp_path: Path) -> None:
    """cryptsetup's own AF split (stripes 4000, sha256 and sha512) is what we merge."""
    require_tool("cryptsetup")
    vk = os.urandom(64)
    (tmp_path / "vk").write_bytes(vk)
    for af_hash in ("sha256", "sha512"):
        img = tmp_path / f"cs-{af_hash}.img"
        img.write_bytes(bytes(20 << 20))
        r = _cs("luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                "--hash", af_hash, "--volume-key-file", str(tmp_path / "vk"), "--key-file", "-", str(img), stdin=PW)
        assert r.returncode == 0, r.stderr
        with open(img, "rb") as f:
            h = read_header(f)
            assert h.metadata["keyslots"]["0"]["af"]["hash"] == af_hash
            assert open_keyslot(h, f, "0", PW) == vk
            assert open_keyslot(h, f, "0", b"wrong") is None


# --- our writer, judged ------------------------------------------------------------------------

@pytest.mark.parametrize("ss", [512, 4096])
def test_cryptsetup_accepts_our_volume(tmp_path: Path, plain: Path, ss: int) -> None:
    require_tool("cryptsetup")
    out = tmp_path / "root.luks"
    res = encrypt_image(plain, out, [KeyslotSpec(PW, FAST_ARGON)], sector_size=ss)
    assert res["sector_size"] == ss and out.stat().st_size == (16 << 20) + plain.stat().st_size
    dump = _cs("luksDump", str(out))
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout.decode()
    assert "aes-xts-plain64" in text and f"sector: {ss} [bytes]" in text and "argon2id" in text
    assert _cs("open", "--test-passphrase", "--key-file", "-", str(out), stdin=PW).returncode == 0
    bad = _cs("open", "--test-passphrase", "--key-file", "-", str(out), stdin=b"wrong")
    assert bad.returncode == 2, bad.stderr


@pytest.mark.parametrize("ss", [512, 4096])
def test_cryptsetup_decrypts_our_data(tmp_path: Path, plain: Path, ss: int) -> None:
    """`cryptsetup reencrypt --decrypt` (detached header: cryptsetup 2.6 decrypts only those)
    turns our ciphertext back into the plaintext — pins the plain64 tweak in 512-byte units even
    for 4096-byte sectors."""
    require_tool("cryptsetup")
    from templatetool.bitlocker.cipher import XtsCipher
    from templatetool.luks.volume import crypt_units

    vk = os.urandom(64)
    hdr = tmp_path / "hdr"
    hdr.write_bytes(build_metadata_region(vk, [KeyslotSpec(PW, FAST)], sector_size=ss, detached=True))
    # the attached writer's data path, on a detached data file
    enc = tmp_path / "data"
    encrypt_image(plain, tmp_path / "att.luks", [KeyslotSpec(PW, FAST)], sector_size=ss, volume_key=vk)
    with open(tmp_path / "att.luks", "rb") as f:
        f.seek(16 << 20)
        enc.write_bytes(f.read())
    buf = bytearray(plain.read_bytes() + bytes(16))
    crypt_units(XtsCipher(vk, ss), memoryview(buf), len(buf) - 16, 0, True)
    assert enc.read_bytes() == bytes(buf[:-16])
    r = _cs("reencrypt", "--decrypt", "--force-offline-reencrypt", "-q", "--header", str(hdr), "--key-file", "-",
            str(enc), stdin=PW)
    assert r.returncode == 0, r.stderr
    assert enc.read_bytes() == plain.read_bytes()
    # the header cryptsetup left (a "linear" segment, no encryption) still reads
    seg = describe(hdr)["segments"]["0"]
    assert seg["type"] == "linear" and "encryption" not in seg
    with pytest.raises(UnsupportedError):
        decrypt_image(hdr, tmp_path / "nothing", PW)


def test_dissect_reads_our_volume(tmp_path: Path, plain: Path) -> None:
    require_module("dissect.fve")
    from dissect.fve.luks import LUKS

    out = tmp_path / "root.luks"
    encrypt_image(plain, out, [KeyslotSpec(PW, FAST)])
    with open(out, "rb") as f:
        v = LUKS(f)
        v.unlock_with_passphrase(PW)
        assert v.open().read(plain.stat().st_size) == plain.read_bytes()


# --- our reader on cryptsetup's volumes --------------------------------------------------------

def test_we_decrypt_what_cryptsetup_encrypted(tmp_path: Path) -> None:
    require_tool("cryptsetup")
    orig = os.urandom(24 << 20)
    img = tmp_path / "cs.img"
    img.write_bytes(orig)
    r = _cs("reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", "16M", "--force-offline-reencrypt",
            "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "-q", "--key-file", "-", str(img), stdin=PW)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back.img"
    res = decrypt_image(img, back, PW)
    assert res["data_size"] == 16 << 20  # cryptsetup put the data segment at 8 MiB (half the reduction)
    assert back.read_bytes()[:8 << 20] == orig[:8 << 20]  # the device shrank by 16 MiB: 8 MiB of data kept
    with pytest.raises(CredentialError):
        decrypt_image(img, tmp_path / "x.img", b"wrong")
    assert not (tmp_path / "x.img").exists()


def test_round_trip_and_header_copies(tmp_path: Path, plain: Path) -> None:
    out = tmp_path / "root.luks"
    encrypt_image(plain, out, [KeyslotSpec(PW, FAST)])
    back = tmp_path / "back.img"
    decrypt_image(out, back, PW)
    assert back.read_bytes() == plain.read_bytes()
    d = describe(out)
    assert d["copies"] == {"primary": True, "secondary": True} and d["hdr_size"] == HDR_SIZE
    # a damaged primary JSON area: the secondary copy is used
    raw = bytearray(out.read_bytes())
    raw[4096 + 10] ^= 0xFF
    out.write_bytes(raw)
    d = describe(out)
    assert d["copies"] == {"primary": False, "secondary": True}
    decrypt_image(out, back, PW)
    assert back.read_bytes() == plain.read_bytes()
    raw[HDR_SIZE + 4096 + 10] ^= 0xFF
    out.write_bytes(raw)
    with pytest.raises(IntegrityError):
        describe(out)


def test_argon2id_matches_cryptsetup(tmp_path: Path) -> None:
    """An Argon2id keyslot made by cryptsetup opens with our KDF (memory/time/cpus as stored)."""
    require_tool("cryptsetup")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(20 << 20))
    r = _cs("luksFormat", "--type", "luks2", "-q", "--pbkdf", "argon2id", "--pbkdf-memory", "8192",
            "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "2", "--key-file", "-", str(img), stdin=PW)
    assert r.returncode == 0, r.stderr
    with open(img, "rb") as f:
        h = read_header(f)
        kdf = h.metadata["keyslots"]["0"]["kdf"]
        assert (kdf["type"], kdf["memory"], kdf["cpus"]) == ("argon2id", 8192, 2)
        assert open_keyslot(h, f, "0", PW) is not None
        assert len(derive(kdf, PW, 64)) == 64


# --- hostile headers ---------------------------------------------------------------------------

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 70), st.text(max_size=8),
                  st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _paths(obj: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    return out


@pytest.fixture(scope="module")
def small_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    src = d / "src.img"
    src.write_bytes(os.urandom(8192))
    encrypt_image(src, d / "v.luks", [KeyslotSpec(PW, FAST)])
    return d / "v.luks"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hostile_metadata_gives_clean_errors(small_volume: Path, data: st.DataObject, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any JSON value replaced by junk (checksums made valid again): the reader answers with a
    TemplateToolError or succeeds, never another exception."""
    import json

    from templatetool.errors import TemplateToolError
    from templatetool.luks.metadata import build_header_copies

    vol = small_volume.read_bytes()
    with open(small_volume, "rb") as f:
        meta = read_header(f).metadata
    path = data.draw(st.sampled_from(_paths(meta)))
    node = meta
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = data.draw(_JUNK)
    try:
        hdr = build_header_copies(json.loads(json.dumps(meta)))
    except TemplateToolError:
        return
    img = tmp_path_factory.mktemp("h") / "v.luks"
    img.write_bytes(hdr + vol[len(hdr):])
    for fn in (lambda: describe(img), lambda: decrypt_image(img, img.with_suffix(".out"), PW)):
        with contextlib.suppress(TemplateToolError):
            fn()

