"""BitLocker To Go (removable-media layout) volumes: written by us, judged by pybde, dissect.fve
and dislocker-file, read back by our decrypt / bitlocker info (issue 13 item 2).

No Windows-made To Go image is available offline (dfvfs' bdetogo.raw is not in ../shared), so
we write the layout with ``encrypt_volume(layout="to-go")`` and let the three independent
readers open it with a recovery password, a password and a startup key.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from templatetool.bitlocker import structs as S
from templatetool.bitlocker.volume import is_bitlocker, open_fve
from templatetool.blockdev import RawFile
from templatetool.disk import sniff_filesystem

from .conftest import assert_clean_error, run_cli
from .test_bitlocker_common import dislocker_decrypt, dissect_sha256, file_sha256, pybde_sha256
from .test_decrypt_anyfs import encrypt_volume_with, make_exfat, make_fat32, make_random

PASSWORD = "ToGo-Passw0rd"  # ASCII: dislocker 0.7.3 mis-encodes non-ASCII passwords


@dataclass
class ToGo:
    plain: Path
    enc: Path
    rp: str
    bek: Path
    size: int


@pytest.fixture(scope="module")
def togo(tmp_path_factory: pytest.TempPathFactory) -> ToGo:
    d = tmp_path_factory.mktemp("togo")
    plain = make_fat32(d / "plain.img")
    enc = d / "enc.img"
    rp, bek = encrypt_volume_with(plain, enc, layout="to-go", password=PASSWORD)
    return ToGo(plain, enc, rp, bek, plain.stat().st_size)


def test_to_go_header_fields(togo: ToGo) -> None:
    """The fields readers check: EB 58 90, MSWIN4.1, GUID at 0x1A8, the offsets at 0x1B8 equal to
    the metadata blocks' own, total sectors, 55AA; no -FVE-FS- in the header."""
    head = togo.enc.read_bytes()[:512]
    assert head[:3] == b"\xeb\x58\x90" and head[3:11] == b"MSWIN4.1"
    assert uuid.UUID(bytes_le=head[0x1A8:0x1B8]) == S.BITLOCKER_GUID
    offs = struct.unpack_from("<3Q", head, 0x1B8)
    assert head[0x1FE:0x200] == b"\x55\xaa"
    assert struct.unpack_from("<I", head, 0x20)[0] * 512 == togo.size
    assert struct.unpack_from("<Q", head, 0x38)[0] == 0  # else dislocker reads it as Vista
    assert b"-FVE-FS-" not in head
    dev = RawFile(togo.enc)
    try:
        assert is_bitlocker(dev) and sniff_filesystem(dev) == "bitlocker-to-go"
        fve = open_fve(dev)
        assert fve.layout == "to-go" and fve.metadata.metadata_offsets == offs
        for o in offs:
            assert dev.read(o, 8) == S.FVE_SIGNATURE
    finally:
        dev.close()


@pytest.mark.parametrize("cred", ["recovery_password", "password", "startup_key"])
def test_pybde_reads_to_go(togo: ToGo, cred: str) -> None:
    kw = {"recovery_password": {"recovery_password": togo.rp}, "password": {"password": PASSWORD},
          "startup_key": {"bek_path": togo.bek}}[cred]
    assert pybde_sha256(togo.enc, togo.size, **kw) == file_sha256(togo.plain)


@pytest.mark.parametrize("cred", ["recovery_password", "password", "startup_key"])
def test_dislocker_reads_to_go(togo: ToGo, cred: str, tmp_path: Path) -> None:
    kw = {"recovery_password": {"recovery_password": togo.rp}, "password": {"password": PASSWORD},
          "startup_key": {"bek_path": togo.bek}}[cred]
    out = dislocker_decrypt(togo.enc, tmp_path / "dis.raw", **kw)
    assert file_sha256(out, togo.size) == file_sha256(togo.plain)


@pytest.mark.parametrize("cred", ["recovery_password", "password", "startup_key"])
def test_dissect_reads_to_go(togo: ToGo, cred: str) -> None:
    kw = {"recovery_password": {"recovery_password": togo.rp}, "password": {"password": PASSWORD},
          "startup_key": {"bek_path": togo.bek}}[cred]
    spans = [(0, 64 * 1024), (1 << 20, 1 << 20), (togo.size - 65536, 65536)]  # dissect is slow: sample
    dev = RawFile(togo.plain)
    try:
        import hashlib

        h = hashlib.sha256()
        for o, n in spans:
            h.update(dev.read(o, n))
    finally:
        dev.close()
    assert dissect_sha256(togo.enc, togo.size, spans=spans, **kw) == h.hexdigest()


@pytest.mark.parametrize("cred", ["recovery_password", "password", "startup_key"])
def test_our_decrypt_reads_to_go(togo: ToGo, cred: str, tmp_path: Path) -> None:
    args = {"recovery_password": ["--recovery-password-env", "RP"], "password": ["--password-env", "PW"],
            "startup_key": ["--startup-key", str(togo.bek)]}[cred]
    out = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(togo.enc), "-o", str(out), *args, "--json", env={"RP": togo.rp, "PW": PASSWORD})
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["layout"] == "to-go"
    want = file_sha256(togo.plain)
    assert file_sha256(out) == want
    assert pybde_sha256(togo.enc, togo.size, bek_path=togo.bek) == want


def test_bitlocker_info_to_go(togo: ToGo) -> None:
    cp = run_cli("bitlocker", "info", str(togo.enc), "--json")
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)["result"]
    assert doc["layout"] == "to-go"
    assert sorted(p["type"] for p in doc["protectors"]) == ["password", "recovery-password", "startup-key"]
    cp = run_cli("bitlocker", "info", str(togo.enc))
    assert cp.returncode == 0 and "BitLocker To Go" in cp.stdout
    cp = run_cli("inspect", str(togo.enc), "--json")
    assert cp.returncode == 0, cp.stderr
    assert "xts-aes-128" in cp.stdout and "bitlocker-to-go" in cp.stdout  # inspect shows its details


def test_to_go_in_mbr_partition(togo: ToGo, tmp_path: Path) -> None:
    """A To Go volume as partition 1 of an MBR disk (a USB stick image) is found and decrypted."""
    start = 2048
    disk = tmp_path / "stick.img"
    vol = togo.enc.read_bytes()
    mbr = bytearray(512)
    nsect = len(vol) // 512
    mbr[0x1BE:0x1CE] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x0C, b"\xfe\xff\xff", start, nsect)
    mbr[0x1FE:0x200] = b"\x55\xaa"
    with open(disk, "wb") as f:
        f.write(mbr)
        f.seek(start * 512)
        f.write(vol)
    out = tmp_path / "stick.dec"
    cp = run_cli("decrypt", str(disk), "-o", str(out), "--startup-key", str(togo.bek), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["partition"] == 1
    with open(out, "rb") as f:
        f.seek(start * 512)
        assert f.read(len(vol)) == togo.plain.read_bytes()


def _patched(togo: ToGo, tmp_path: Path, patch: dict[int, bytes]) -> Path:
    img = tmp_path / "patched.img"
    data = bytearray(togo.enc.read_bytes())
    for off, b in patch.items():
        data[off:off + len(b)] = b
    img.write_bytes(data)
    return img


def test_to_go_used_space_only_is_unsupported(togo: ToGo, tmp_path: Path) -> None:
    """A sub-case we do not read (the EOW GUID) is exit 7 naming it, never exit 3."""
    img = _patched(togo, tmp_path, {0x1A8: S.BITLOCKER_EOW_GUID.bytes_le})
    cp = run_cli("bitlocker", "info", str(img))
    assert_clean_error(cp, 7)
    assert "To Go" in cp.stderr and "used-space-only" in cp.stderr


def test_to_go_identifier_elsewhere_is_unsupported(togo: ToGo, tmp_path: Path) -> None:
    img = _patched(togo, tmp_path, {0x1A8: bytes(16), 0x100: S.BITLOCKER_GUID.bytes_le})
    cp = run_cli("decrypt", str(img), "-o", str(tmp_path / "x.raw"), "--startup-key", str(togo.bek))
    assert_clean_error(cp, 7)
    assert "To Go" in cp.stderr and "0x100" in cp.stderr


def test_hand_made_to_go_header_is_read(tmp_path: Path) -> None:
    """Regression (was exit 3 "not a BitLocker volume"): a To Go header laid out by hand from the
    libbde/dislocker field list (not by our writer) over a fixed-layout volume's metadata is
    read by `bitlocker info` and decrypted by `decrypt` to pybde's bytes."""
    plain = make_fat32(tmp_path / "plain.img")
    enc = tmp_path / "enc.img"
    _rp, bek = encrypt_volume_with(plain, enc)
    data = bytearray(enc.read_bytes())
    std = bytes(data[:512])
    head = bytearray(512)
    head[0:0x5A] = std[0:0x5A]  # jump + FAT32-style BPB
    head[3:11] = b"MSWIN4.1"
    head[0x1A8:0x1B8] = S.BITLOCKER_GUID.bytes_le
    head[0x1B8:0x1D0] = std[0xB0:0xC8]  # the three metadata offsets
    struct.pack_into("<I", head, 0x20, len(data) // 512)
    head[0x1FE:0x200] = b"\x55\xaa"
    data[:512] = head
    enc.write_bytes(data)
    cp = run_cli("bitlocker", "info", str(enc), "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["method"] == "xts-aes-128"
    out = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(enc), "-o", str(out), "--startup-key", str(bek))
    assert cp.returncode == 0, cp.stderr
    want = file_sha256(plain)
    assert file_sha256(out) == want
    assert pybde_sha256(enc, plain.stat().st_size, bek_path=bek) == want


@pytest.mark.parametrize("name,patch", [
    ("jump", {0: b"\xe9\x00\x00"}),
    ("sector size", {0x0B: b"\x00\x00"}),
    ("offset zero", {0x1B8: bytes(8)}),
    ("offset outside", {0x1C0: struct.pack("<Q", 1 << 40)}),
    ("no 55AA", {0x1FE: b"\x00\x00"}),
    ("vista lcn", {0x38: b"\x01"}),
])
def test_malformed_to_go_header_is_a_clean_format_error(togo: ToGo, tmp_path: Path, name: str,
                                                        patch: dict[int, bytes]) -> None:
    img = _patched(togo, tmp_path, patch)
    cp = run_cli("bitlocker", "info", str(img))
    assert_clean_error(cp, 3)


def test_to_go_4096_byte_sectors(tmp_path: Path) -> None:
    """To Go with 4 KiB sectors (random content): pybde and dislocker-file agree with the plaintext."""
    plain = make_random(tmp_path / "plain.img")
    enc = tmp_path / "enc.img"
    _rp, bek = encrypt_volume_with(plain, enc, layout="to-go", sector_size=4096)
    head = enc.read_bytes()[:512]
    assert struct.unpack_from("<H", head, 0x0B)[0] == 4096 and head[3:11] == b"MSWIN4.1"
    want = file_sha256(plain)
    assert pybde_sha256(enc, plain.stat().st_size, bek_path=bek) == want
    out = dislocker_decrypt(enc, tmp_path / "dis.raw", bek_path=bek)
    assert file_sha256(out, plain.stat().st_size) == want
    dec = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--startup-key", str(bek))
    assert cp.returncode == 0, cp.stderr
    assert file_sha256(dec) == want


def test_to_go_exfat(tmp_path: Path) -> None:
    """exFAT inside To Go (Windows' usual USB-stick case): our decrypt and pybde give the plaintext."""
    plain = make_exfat(tmp_path / "plain.img")
    enc = tmp_path / "enc.img"
    rp, bek = encrypt_volume_with(plain, enc, layout="to-go")
    dec = tmp_path / "dec.img"
    cp = run_cli("decrypt", str(enc), "-o", str(dec), "--recovery-password-env", "RP", "--json", env={"RP": rp})
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["result"]["free_space"]["filesystem"] == "exfat"
    want = file_sha256(plain)
    assert file_sha256(dec) == want
    assert pybde_sha256(enc, plain.stat().st_size, bek_path=bek) == want
