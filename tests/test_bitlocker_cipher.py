"""Batched sector ciphers against cryptography's per-sector modes and the IEEE 1619 XTS vectors."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from templatetool.bitlocker import structs as S
from templatetool.bitlocker.cipher import (
    CbcCipher,
    DiffuserCipher,
    XtsCipher,
    make_cipher,
    native_xts_available,
)
from templatetool.errors import FormatError, UnsupportedError

SECTORS = [0, 1, 2**32 - 3, 2**40 + 17, 2**63 + 5]


def _xts_ref(key: bytes, data: bytes, first: int, ss: int) -> bytes:
    return b"".join(Cipher(algorithms.AES(key), modes.XTS((first + i).to_bytes(16, "little"))).encryptor()
                    .update(data[i * ss:(i + 1) * ss]) for i in range(len(data) // ss))


@pytest.fixture(params=["native", "numpy"])
def xts_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both XTS implementations: the C loop over OpenSSL and the numpy batch."""
    if request.param == "native":
        if not native_xts_available():
            if os.environ.get("TEMPLATETOOL_CI"):
                pytest.fail("templatetool._xts was not built: CI must test the fast path")
            pytest.skip("templatetool._xts not built (needs gcc and libcrypto.so.3)")
    else:
        monkeypatch.setenv("TEMPLATETOOL_NATIVE", "0")
    return str(request.param)


@pytest.mark.parametrize("keylen", [32, 64])
@pytest.mark.parametrize("ss", [512, 4096])
@pytest.mark.parametrize("first", SECTORS)
def test_xts_matches_cryptography_per_sector(xts_path: str, keylen: int, ss: int, first: int) -> None:
    key = os.urandom(keylen)
    data = os.urandom(ss * 7)
    x = XtsCipher(key, ss)
    assert (x._native_key is not None) == (xts_path == "native")
    ct = x.encrypt(data, first)
    assert ct == _xts_ref(key, data, first, ss)
    assert x.decrypt(ct, first) == data
    out = memoryview(bytearray(len(data) + 64))
    x.encrypt_into(data, first, out)
    assert bytes(out[:len(data)]) == ct
    back = memoryview(bytearray(len(data) + 16))
    x.decrypt_into(ct, first, back)
    assert bytes(back[:len(data)]) == data
    assert x.encrypt_to_array(data, first).tobytes() == ct


def test_native_and_numpy_paths_agree_on_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    if not native_xts_available():
        pytest.skip("templatetool._xts not built")
    key, data = os.urandom(32), os.urandom(1 << 20)
    fast = XtsCipher(key, 512).encrypt(data, 2**33 + 1)
    monkeypatch.setenv("TEMPLATETOOL_NATIVE", "0")
    assert XtsCipher(key, 512).encrypt(data, 2**33 + 1) == fast


# IEEE Std 1619-2007 Annex B, vectors 1-3 (32-byte data units) and vector 4 (512-byte data unit).
IEEE = [
    ("00" * 16, "00" * 16, 0, "00" * 32,
     "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
    ("11" * 16, "22" * 16, 0x3333333333, "44" * 32,
     "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
    ("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0", "22" * 16, 0x3333333333, "44" * 32,
     "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89"),
]


@pytest.mark.parametrize("k1,k2,unit,pt,ct", IEEE)
def test_xts_ieee1619_vectors(xts_path: str, k1: str, k2: str, unit: int, pt: str, ct: str) -> None:
    x = XtsCipher(bytes.fromhex(k1 + k2), 32)
    assert x.encrypt(bytes.fromhex(pt), unit).hex() == ct
    assert x.decrypt(bytes.fromhex(ct), unit).hex() == pt


def test_xts_ieee1619_vector4_512_byte_unit(xts_path: str) -> None:
    key = bytes.fromhex("27182818284590452353602874713526" "31415926535897932384626433832795")
    pt = bytes(range(256)) * 2
    x = XtsCipher(key, 512)
    ct = x.encrypt(pt, 0)
    assert ct[:16].hex() == "27a7479befa1d476489f308cd4cfa6e2"
    assert ct == _xts_ref(key, pt, 0, 512)


@pytest.mark.parametrize("keylen", [16, 32])
@pytest.mark.parametrize("ss", [512, 4096])
def test_cbc_matches_cryptography_per_sector(keylen: int, ss: int) -> None:
    key = os.urandom(keylen)
    first = 12345
    data = os.urandom(ss * 5)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    ref = b"".join(
        Cipher(algorithms.AES(key), modes.CBC(ecb.update(((first + i) * ss).to_bytes(16, "little")))).encryptor()
        .update(data[i * ss:(i + 1) * ss]) for i in range(5))
    c = CbcCipher(key, ss)
    assert c.encrypt(data, first) == ref
    assert c.decrypt(ref, first) == data


@pytest.mark.parametrize("method", [S.METHOD_AES_128_DIFFUSER, S.METHOD_AES_256_DIFFUSER])
def test_diffuser_roundtrip_and_diffusion(method: int) -> None:
    # Correctness against Windows is shown by the diffuser samples (test_bitlocker_samples.py).
    d = DiffuserCipher(os.urandom(64), 512, method)
    data = os.urandom(512 * 4)
    ct = d.encrypt(data, 99)
    assert d.decrypt(ct, 99) == data
    flipped = bytearray(ct)
    flipped[-1] ^= 1  # one bit of the last block changes the whole decrypted sector (Elephant)
    pt2 = d.decrypt(bytes(flipped), 99)
    assert pt2[1536:1536 + 16] != data[1536:1536 + 16] and pt2[:1536] == data[:1536]


def test_make_cipher_rejects_bad_input() -> None:
    with pytest.raises(UnsupportedError):
        make_cipher(0x9000, bytes(32), 512)
    with pytest.raises(FormatError):
        make_cipher(S.METHOD_XTS_AES_128, bytes(16), 512)
    with pytest.raises(FormatError):
        XtsCipher(bytes(32), 512).encrypt(bytes(100), 0)
