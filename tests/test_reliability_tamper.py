"""Tamper tests: ≥ 1,000 seeded random byte flips across VSC, PDK, KP and FVE metadata.

* VSC (CMS SignedData), PDK (owner-signed CMS), KP ([MS-KPS] XML): every flip must be detected —
  the library call raises a TemplateToolError (never another exception, never success).
* BitLocker FVE metadata: a flip in *one* of the three metadata copies must leave the volume
  openable from the other copies, unlocking and decrypting byte-identically (judged against the
  decryption of the untouched volume and, once, against dislocker-file). The same flip in *all
  three* copies must be detected (error at open or unlock), unless the byte is outside anything a
  reader interprets (then the result must still be byte-identical).

Library-level calls (faster than the CLI); flips are XOR with a random non-zero byte.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest

from templatetool.blockdev import BlockDevice, RawFile
from templatetool.errors import TemplateToolError

from . import corpus_gen as cg

SEED = 20261127
N_VSC, N_PDK, N_KP = 250, 250, 250
N_FVE_ONE, N_FVE_ALL = 250, 60


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> cg.Artifacts:
    return cg.session_artifacts(tmp_path_factory)


def _flips(data: bytes, n: int, seed: int, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
    r = random.Random(seed)
    hi = len(data) if hi is None else hi
    return [(r.randrange(lo, hi), r.randrange(1, 256)) for _ in range(n)]


def _apply(data: bytes, off: int, x: int) -> bytes:
    b = bytearray(data)
    b[off] ^= x
    return bytes(b)


class Accepted(Exception):
    """Raised by a check when the tampered input was accepted."""


def _undetected(data: bytes, flips: list[tuple[int, int]], check) -> tuple[list[str], dict[str, int]]:
    misses, kinds = [], {}
    for off, x in flips:
        bad = _apply(data, off, x)
        try:
            check(bad)
        except TemplateToolError as e:
            kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
            continue
        except Accepted as e:
            misses.append(f"offset {off} ^{x:#04x}: {e} (context {data[max(0, off - 12):off + 12]!r})")
            continue
        except Exception as e:  # noqa: BLE001 - an untyped exception is a bug too
            misses.append(f"offset {off} ^{x:#04x}: untyped {type(e).__name__}: {e}"[:300])
            continue
        misses.append(f"offset {off} ^{x:#04x}: accepted")
    return misses, kinds


def test_vsc_flips_detected(art: cg.Artifacts) -> None:
    from templatetool.catalog.vsc import open_vsc

    der = art["template.vsc"].read_bytes()
    open_vsc(der)  # the untouched catalog verifies
    misses, kinds = _undetected(der, _flips(der, N_VSC, SEED + 1), open_vsc)
    assert not misses, f"{len(misses)}/{N_VSC} VSC flips undetected:\n" + "\n".join(misses[:20])
    assert sum(kinds.values()) == N_VSC


def test_pdk_flips_detected(art: cg.Artifacts) -> None:
    from templatetool.guardian.model import load_guardian
    from templatetool.pdk.shielding import open_pdk_secret, read_pdk

    der = art["tenant.pdk"].read_bytes()
    owner = load_guardian(art.demo / "owner", private=True)
    ok = read_pdk(der)
    secret = open_pdk_secret(ok, owner.encryption_key, owner.encryption_certificate).to_bytes()

    def check(bad: bytes) -> None:
        info = read_pdk(bad)
        # the signed clear part verified: the secret part must still be the original one
        same = open_pdk_secret(info, owner.encryption_key, owner.encryption_certificate).to_bytes() == secret
        raise Accepted("read_pdk accepted; secret part " + ("unchanged" if same else "CHANGED"))

    misses, kinds = _undetected(der, _flips(der, N_PDK, SEED + 2), check)
    assert not misses, f"{len(misses)}/{N_PDK} PDK flips undetected:\n" + "\n".join(misses[:20])


def test_kp_flips_detected(art: cg.Artifacts) -> None:
    from templatetool.guardian.model import load_guardian
    from templatetool.kp.protector import parse_kp, unwrap

    xml = art["vm.kp"].read_bytes()
    fabric = load_guardian(art.demo / "fabric", private=True)
    secret = unwrap(xml, fabric)

    def check(bad: bytes) -> None:
        parse_kp(bad)
        same = unwrap(bad, fabric) == secret
        raise Accepted("parse_kp and unwrap accepted; secret " + ("unchanged" if same else "CHANGED"))

    misses, kinds = _undetected(xml, _flips(xml, N_KP, SEED + 3), check)
    assert not misses, f"{len(misses)}/{N_KP} KP flips undetected:\n" + "\n".join(misses[:20])


# ---- BitLocker ------------------------------------------------------------------------------

class Patched(BlockDevice):
    """A read-only view of a raw file with byte patches applied (no copy of the volume)."""

    def __init__(self, base: RawFile, patches: dict[int, int]) -> None:
        self.base = base
        self.size = base.size
        self.sector_size = base.sector_size
        self.name = f"{base.name} (patched)"
        self.patches = patches

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        data = self.base.read(offset, length)
        hit = [o for o in self.patches if offset <= o < offset + length]
        if not hit:
            return data
        b = bytearray(data)
        for o in hit:
            b[o - offset] ^= self.patches[o]
        return bytes(b)


def _decrypted_sha(dev: BlockDevice, bek: bytes) -> str:
    from templatetool.bitlocker.volume import open_fve

    plain = open_fve(dev).unlock(bek=bek)
    h = hashlib.sha256()
    for pos in range(0, plain.size, 1 << 20):
        h.update(plain.read(pos, min(1 << 20, plain.size - pos)))
    return h.hexdigest()


@pytest.fixture(scope="module")
def fve(art: cg.Artifacts) -> dict:
    from templatetool.bitlocker import structs as S

    raw = RawFile(art["bl.img"])
    head = raw.read(0, 512)
    offs = struct.unpack_from("<QQQ", head, 0xB0)
    blk = raw.read(offs[0], 64 * 1024)
    cov = S.BlockHeader.parse(blk[:64]).header_size * 16
    ventry = struct.unpack_from("<H", blk, cov + 8)[0]  # the validation AES-CCM entry after its 8-byte header
    used = cov + 8 + ventry
    bek = art["bl.bek"].read_bytes()
    return {"raw": raw, "offs": offs, "cov": cov, "used": used, "bek": bek, "sha": _decrypted_sha(raw, bek)}


def test_fve_reference_matches_plaintext(art: cg.Artifacts, fve: dict) -> None:
    """Our decryption of the untouched volume equals the plaintext volume outside the FVE regions."""
    from templatetool.bitlocker.volume import open_fve

    plain = open_fve(fve["raw"]).unlock(bek=fve["bek"])
    ref = art["bl-plain.img"].read_bytes()
    got = plain.read(0, plain.size)
    assert len(got) == len(ref)
    regions = open_fve(fve["raw"]).regions()
    for off, n in regions.spans():
        ref = ref[:off] + bytes(n) + ref[off + n:]
        got = got[:off] + bytes(n) + got[off + n:]
    assert got == ref


def _one_copy_failures(fve: dict, flips: list[tuple[int, int, int]]) -> list[str]:
    failures = []
    for copy, off, x in flips:
        dev = Patched(fve["raw"], {fve["offs"][copy] + off: x})
        try:
            sha = _decrypted_sha(dev, fve["bek"])
        except TemplateToolError as e:
            failures.append(f"copy {copy + 1} offset {off:#x} ^{x:#04x}: {type(e).__name__}: {e}"[:300])
            continue
        if sha != fve["sha"]:
            failures.append(f"copy {copy + 1} offset {off:#x} ^{x:#04x}: decrypts to different bytes")
    return failures


def test_fve_one_copy_flips_still_open(fve: dict) -> None:
    """≥ 250 flips, each in one metadata copy: the volume opens from the others, decrypts identically.

    (Flips in copy 1's validation entry are in the strict-xfail test below.)"""
    r = random.Random(SEED + 4)
    flips = []
    while len(flips) < N_FVE_ONE:
        copy = r.randrange(3)
        # mostly inside the interpreted part (header, dataset, validation), some in the padding
        off = r.randrange(fve["used"]) if r.random() < 0.9 else r.randrange(64 * 1024)
        if copy == 0 and fve["cov"] <= off < fve["used"]:
            continue
        flips.append((copy, off, r.randrange(1, 256)))
    failures = _one_copy_failures(fve, flips)
    assert not failures, f"{len(failures)}/{N_FVE_ONE} single-copy flips broke the volume:\n" + "\n".join(failures[:25])


def test_fve_copy1_validation_flips_still_open(fve: dict) -> None:
    r = random.Random(SEED + 6)
    flips = [(0, r.randrange(fve["cov"], fve["used"]), r.randrange(1, 256)) for _ in range(30)]
    failures = _one_copy_failures(fve, flips)
    assert not failures, f"{len(failures)}/30 flips in copy 1's validation entry broke the volume:\n" + \
        "\n".join(failures[:10])


def test_fve_all_copies_flips_detected(fve: dict) -> None:
    """The same flip in all three copies: detected, or (outside interpreted bytes) harmless."""
    r = random.Random(SEED + 5)
    silent_change = []
    detected = 0
    for i in range(N_FVE_ALL):
        off = r.randrange(fve["used"])
        x = r.randrange(1, 256)
        dev = Patched(fve["raw"], {o + off: x for o in fve["offs"]})
        try:
            sha = _decrypted_sha(dev, fve["bek"])
        except TemplateToolError:
            detected += 1
            continue
        if sha != fve["sha"]:
            silent_change.append(f"offset {off:#x} ^{x:#04x}")
    assert not silent_change, "undetected metadata changes that alter the plaintext: " + ", ".join(silent_change)
    assert detected >= N_FVE_ALL * 0.9, f"only {detected}/{N_FVE_ALL} detected"


def test_fve_damaged_copy1_validation_opens_in_dislocker(art: cg.Artifacts, fve: dict, tmp_path: Path) -> None:
    """An independent reader shows what is expected: with copy 1's validation entry damaged,
    dislocker-file still decrypts the same bytes (from another copy)."""
    import subprocess

    from templatetool.bitlocker.volume import open_fve

    from .conftest import require_tool

    require_tool("dislocker-file")
    vol = tmp_path / "v.img"
    b = bytearray(art["bl.img"].read_bytes())
    b[fve["offs"][0] + fve["cov"] + 40] ^= 0x01
    vol.write_bytes(bytes(b))
    out = tmp_path / "out.img"
    cp = subprocess.run(["dislocker-file", "-V", str(vol), "-f", str(art["bl.bek"]), "--", str(out)],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout[-1500:] + cp.stderr
    ours = open_fve(fve["raw"]).unlock(bek=fve["bek"])  # the untouched volume
    theirs = out.read_bytes()
    mine = ours.read(0, ours.size)
    for off, n in open_fve(fve["raw"]).regions().spans():  # readers differ only in what they show for FVE regions
        theirs = theirs[:off] + bytes(n) + theirs[off + n:]
        mine = mine[:off] + bytes(n) + mine[off + n:]
    assert hashlib.sha256(theirs).digest() == hashlib.sha256(mine).digest()


def test_flip_count() -> None:
    assert N_VSC + N_PDK + N_KP + N_FVE_ONE + N_FVE_ALL >= 1000
