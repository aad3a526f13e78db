"""LUKS2 volumes: create keyslots and the volume key digest, encrypt a raw image into a new LUKS2
image, unlock with a passphrase, decrypt back, describe.

Keyslot (spec 3.2): the volume key is AF-split (``af.py``, 4000 stripes), and the split material
is encrypted with aes-xts-plain64 under a key derived from the passphrase (``kdf.py``), in
512-byte sectors numbered from 0 at the start of the keyslot's area. The digest (spec 3.5) is
PBKDF2-SHA256 over the volume key. Data segment: aes-xts-plain64, the tweak of each
``sector_size`` unit its *512-byte* sector number from the segment start as a little-endian
128-bit number (plain64; LUKS2 does not set dm-crypt's ``iv_large_sectors``, so a 4096-byte unit
at byte offset o has tweak o / 512, measured against cryptsetup). With 512-byte units this is
BitLocker's XTS tweak scheme, so ``bitlocker.cipher.XtsCipher`` encrypts a run in one call;
larger units are one call each.
"""

from __future__ import annotations

import copy
import hmac
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..atomic import atomic_output
from ..bitlocker.cipher import XtsCipher
from ..errors import CredentialError, FormatError, NotFoundError, ResourceError, UnsupportedError, UsageError
from ..progress import progress
from . import af, kdf
from .metadata import (
    AREA_ALIGN,
    DATA_OFFSET,
    HDR_SIZE,
    KEYSLOTS_OFFSET,
    LuksHeader,
    _u64,
    build_header_copies,
    read_header,
)

CIPHER = "aes-xts-plain64"
KEY_SIZE = 64  # aes-xts-plain64 with a 512-bit key: AES-256 in XTS
STRIPES = 4000
AREA_SECTOR = 512
DIGEST_ITERATIONS = 100_000
CHUNK = 1 << 20


@dataclass(frozen=True)
class KeyslotSpec:
    """A keyslot to create: its passphrase (bytes), KDF and an optional token bound to it."""

    passphrase: bytes = field(repr=False)
    kdf: kdf.KdfParams
    token: dict[str, Any] | None = None
    af_hash: str = "sha256"


def _align(n: int, a: int = AREA_ALIGN) -> int:
    return (n + a - 1) // a * a


def crypt_units(cipher: XtsCipher, buf: memoryview, n: int, byte_offset: int, encrypt: bool) -> None:
    """En/decrypt ``buf[:n]`` in place: whole ``cipher.sector_size`` units lying ``byte_offset``
    bytes into the segment; ``buf`` needs 16 spare bytes after ``n`` (the ``*_into`` scratch)."""
    ss = cipher.sector_size
    run = cipher.encrypt_into if encrypt else cipher.decrypt_into
    if ss == 512:
        run(buf[:n], byte_offset // 512, buf)
        return
    for u in range(0, n, ss):
        run(buf[u : u + ss], (byte_offset + u) // 512, buf[u:])


def _area_cipher(key: bytes) -> XtsCipher:
    return XtsCipher(key, AREA_SECTOR)


def make_keyslot(volume_key: bytes, spec: KeyslotSpec, area_offset: int) -> tuple[dict[str, Any], bytes]:
    """The keyslot JSON object and its encrypted area bytes (padded to the area size)."""
    if not spec.passphrase:
        raise CredentialError("the passphrase is empty")
    kdf_json = kdf.new_kdf_json(spec.kdf)
    area_key = kdf.derive(kdf_json, spec.passphrase, KEY_SIZE)
    material = af.af_split(volume_key, STRIPES, spec.af_hash)
    size = _align(len(material))
    plain = material + bytes(_align(len(material), AREA_SECTOR) - len(material))
    enc = _area_cipher(area_key).encrypt(plain, 0)
    obj = {
        "type": "luks2",
        "key_size": len(volume_key),
        "af": {"type": "luks1", "stripes": STRIPES, "hash": spec.af_hash},
        "area": {
            "type": "raw",
            "offset": str(area_offset),
            "size": str(size),
            "encryption": CIPHER,
            "key_size": KEY_SIZE,
        },
        "kdf": kdf_json,
    }
    return obj, enc + bytes(size - len(enc))


def make_digest(volume_key: bytes, keyslots: Sequence[str], iterations: int = DIGEST_ITERATIONS) -> dict[str, Any]:
    """The PBKDF2-SHA256 digest object of ``volume_key`` for ``keyslots`` and segment 0."""
    salt = os.urandom(kdf.SALT_LEN)
    return {
        "type": "pbkdf2",
        "keyslots": list(keyslots),
        "segments": ["0"],
        "hash": "sha256",
        "iterations": iterations,
        "salt": kdf.b64(salt),
        "digest": kdf.b64(kdf.pbkdf2("sha256", volume_key, salt, iterations, 32)),
    }


def build_metadata_region(
    volume_key: bytes,
    keyslots: Sequence[KeyslotSpec],
    *,
    sector_size: int,
    data_offset: int = DATA_OFFSET,
    label: str = "",
    uuid: str | None = None,
    detached: bool = False,
) -> bytes:
    """The first ``data_offset`` bytes of a new LUKS2 image: both headers and the keyslot areas.
    ``detached``: a header file for a separate data device (the segment then starts at 0)."""
    if len(volume_key) != KEY_SIZE:
        raise UsageError(f"the volume key must be {KEY_SIZE} bytes")
    if sector_size not in (512, 1024, 2048, 4096):
        raise UsageError(f"sector size {sector_size} is not one of 512, 1024, 2048, 4096")
    if data_offset % AREA_ALIGN or data_offset < KEYSLOTS_OFFSET + AREA_ALIGN:
        raise UsageError(f"data offset {data_offset} is not a 4 KiB multiple past the header")
    region = bytearray(data_offset)
    slots: dict[str, Any] = {}
    tokens: dict[str, Any] = {}
    offset = KEYSLOTS_OFFSET
    for i, spec in enumerate(keyslots):
        obj, area = make_keyslot(volume_key, spec, offset)
        if offset + len(area) > data_offset:
            raise UsageError("the keyslots do not fit before the data offset")
        region[offset : offset + len(area)] = area
        offset += len(area)
        slots[str(i)] = obj
        if spec.token is not None:
            tokens[str(len(tokens))] = dict(spec.token, keyslots=[str(i)])
    meta: dict[str, Any] = {
        "keyslots": slots,
        "tokens": tokens,
        "segments": {
            "0": {
                "type": "crypt",
                "offset": "0" if detached else str(data_offset),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": CIPHER,
                "sector_size": sector_size,
            }
        },
        "digests": {"0": make_digest(volume_key, list(slots))},
        "config": {"json_size": str(HDR_SIZE - 4096), "keyslots_size": str(data_offset - KEYSLOTS_OFFSET)},
    }
    region[: 2 * HDR_SIZE] = build_header_copies(meta, uuid=uuid, label=label)
    return bytes(region)


def encrypt_data(
    cipher: XtsCipher,
    size: int,
    read: Callable[[int, int], bytes],
    write: Callable[[int, memoryview], None],
    desc: str = "luks encrypt",
) -> None:
    """Stream ``size`` plaintext bytes (``read(offset, n)``, offsets from the segment start)
    through the segment cipher into ``write(offset, ciphertext)``, 1 MiB at a time."""
    if size % cipher.sector_size:
        raise FormatError(f"{size} bytes are not whole {cipher.sector_size}-byte sectors")
    buf = bytearray(CHUNK + 16)
    view = memoryview(buf)
    with progress(size, desc) as bar:
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            data = read(pos, n)
            if len(data) != n:
                raise FormatError("short read from the plaintext volume")
            view[:n] = data
            crypt_units(cipher, view, n, pos, True)
            write(pos, view[:n])
            pos += n
            bar.update(n)


def _input_size(f: BinaryIO, path: str) -> int:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise FormatError("the input image is empty", path)
    return size


def default_sector_size(size: int) -> int:
    """4096 when the image is a whole number of 4 KiB units (cryptsetup's choice for files), else 512."""
    return 4096 if size % 4096 == 0 else 512


def encrypt_image(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keyslots: Sequence[KeyslotSpec],
    *,
    sector_size: int | None = None,
    volume_key: bytes | None = None,
    label: str = "",
    overwrite: bool = True,
) -> dict[str, Any]:
    """Encrypt the raw image ``src`` (a root partition: ext4, ...) into a new LUKS2 image ``dst``:
    header and keyslots in the first 16 MiB, then the data encrypted sector by sector. ``src`` is
    only read; ``dst`` appears complete or not at all. Returns a summary (no key material)."""
    if not keyslots:
        raise UsageError("at least one keyslot is needed")
    src_s = str(src)
    if Path(src).resolve() == Path(dst).resolve():
        raise UsageError("the output must differ from the input", str(dst), "LUKS2 images are written anew")
    key = volume_key if volume_key is not None else os.urandom(KEY_SIZE)
    try:
        fin = open(src, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFoundError("input image not found", src_s) from None
    except OSError as e:
        raise ResourceError(f"cannot read the input: {e.strerror}", src_s) from None
    with fin:
        size = _input_size(fin, src_s)
        ss = sector_size or default_sector_size(size)
        if size % ss:
            raise UsageError(
                f"the image size {size} is not a multiple of the {ss}-byte sector size",
                src_s,
                "use 512-byte sectors",
                code="luks.sector-size",
            )
        region = build_metadata_region(key, keyslots, sector_size=ss, label=label)
        cipher = XtsCipher(key, ss)
        with atomic_output(dst, 0o600, overwrite=overwrite) as tmp, open(tmp, "r+b") as out:
            out.write(region)
            buf = bytearray(CHUNK + 16)
            view = memoryview(buf)
            with progress(size, "luks encrypt") as bar:
                pos = 0
                while pos < size:
                    n = fin.readinto(view[: min(CHUNK, size - pos)])
                    if not n:
                        raise FormatError("the input image shrank while it was read", src_s)
                    if n % ss:  # a short read mid-file: top the chunk up to whole sectors
                        while n % ss:
                            m = fin.readinto(view[n : n + (ss - n % ss)])
                            if not m:
                                raise FormatError("the input image shrank while it was read", src_s)
                            n += m
                    crypt_units(cipher, view, n, pos, True)
                    out.write(view[:n])
                    pos += n
                    bar.update(n)
            os.fchmod(out.fileno(), 0o644)
    return {
        "output": str(dst),
        "data_offset": DATA_OFFSET,
        "data_size": size,
        "sector_size": ss,
        "cipher": CIPHER,
        "key_bits": KEY_SIZE * 8,
        "keyslots": len(keyslots),
    }


def _segment_cipher(h: LuksHeader) -> tuple[int, int]:
    seg = h.segment
    if seg.get("type") != "crypt" or seg.get("encryption") != CIPHER:
        raise UnsupportedError(f"segment encryption {seg.get('encryption')!r} is not supported", hint=CIPHER)
    if _u64(seg.get("iv_tweak", "0"), "iv_tweak") != 0:
        raise UnsupportedError("a non-zero segment iv_tweak is not supported")
    ss = seg.get("sector_size")
    if ss not in (512, 1024, 2048, 4096):
        raise FormatError(f"segment sector_size {ss!r} is not valid")
    assert isinstance(ss, int)
    return h.data_offset, ss


def _digests_for(h: LuksHeader, slot: str) -> list[dict[str, Any]]:
    return [d for d in h.metadata["digests"].values() if isinstance(d, dict) and slot in d.get("keyslots", [])]


def _verify_digest(d: dict[str, Any], key: bytes) -> bool:
    if d.get("type") != "pbkdf2":
        raise UnsupportedError(f"digest type {d.get('type')!r} is not supported")
    want = kdf.b64decode(d.get("digest"), "digest")
    it = d.get("iterations")
    if not isinstance(it, int):
        raise FormatError("LUKS2 digest iterations is not a number")
    got = kdf.pbkdf2(str(d.get("hash")), key, kdf.b64decode(d.get("salt"), "digest salt"), it, len(want))
    return hmac.compare_digest(got, want)


def open_keyslot(h: LuksHeader, f: BinaryIO, slot: str, passphrase: bytes) -> bytes | None:
    """The volume key from keyslot ``slot`` if ``passphrase`` opens it, else None."""
    ks = h.metadata["keyslots"][slot]
    if ks.get("type") != "luks2":
        raise UnsupportedError(f"keyslot type {ks.get('type')!r} is not supported")
    area = ks["area"]
    if area.get("type") != "raw" or area.get("encryption") != CIPHER:
        raise UnsupportedError(f"keyslot area encryption {area.get('encryption')!r} is not supported")
    key_size, stripes = ks.get("key_size"), ks.get("af", {}).get("stripes")
    if not isinstance(key_size, int) or not isinstance(stripes, int) or key_size <= 0 or not 0 < stripes <= 65536:
        raise FormatError(f"keyslot {slot} key_size/stripes are not valid")
    if ks.get("af", {}).get("type") != "luks1":
        raise UnsupportedError(f"AF type {ks['af'].get('type')!r} is not supported")
    need = key_size * stripes
    off, size = _u64(area.get("offset"), "area offset"), _u64(area.get("size"), "area size")
    if size < need:
        raise FormatError(f"keyslot {slot} area is smaller than its AF material")
    f.seek(off)
    enc = f.read(_align(need, AREA_SECTOR))
    if len(enc) < _align(need, AREA_SECTOR):
        raise FormatError(f"keyslot {slot} area is past the end of the image")
    area_key_size = area.get("key_size")
    if area_key_size not in (32, 64):
        raise UnsupportedError(f"keyslot area key size {area_key_size!r} is not supported")
    assert isinstance(area_key_size, int)
    akey = kdf.derive(ks.get("kdf", {}), passphrase, area_key_size)
    material = _area_cipher(akey).decrypt(enc, 0)
    cand = af.af_merge(material, key_size, stripes, str(ks["af"].get("hash")))
    return cand if any(_verify_digest(d, cand) for d in _digests_for(h, slot)) else None


def unlock(h: LuksHeader, f: BinaryIO, passphrase: bytes, where: str = "") -> tuple[str, bytes]:
    """(keyslot, volume key) for ``passphrase``; CredentialError when no keyslot accepts it."""
    for slot in sorted(h.metadata["keyslots"], key=int):
        key = open_keyslot(h, f, slot, passphrase)
        if key is not None:
            return slot, key
    raise CredentialError("no LUKS2 keyslot accepts this passphrase", where)


def add_keyslot(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    passphrase: bytes,
    spec: KeyslotSpec,
    overwrite: bool = True,
) -> dict[str, Any]:
    """A copy of the LUKS2 image ``src`` at ``dst`` with one more keyslot (and its token, e.g. a
    systemd-tpm2 one) for the same volume key, unlocked with ``passphrase``. The header is
    rewritten in both copies with ``seqid + 1``; data and other keyslots are unchanged."""
    src_s = str(src)
    if Path(src).resolve() == Path(dst).resolve():
        raise UsageError("the output must differ from the input", str(dst))
    try:
        fin = open(src, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFoundError("input image not found", src_s) from None
    with fin:
        h = read_header(fin, src_s)
        slot, key = unlock(h, fin, passphrase, src_s)
    meta = copy.deepcopy(h.metadata)
    ks_end = 2 * h.hdr_size + _u64(meta["config"].get("keyslots_size"), "config.keyslots_size")
    used_end = max(
        [2 * h.hdr_size]
        + [
            _u64(k["area"]["offset"], "area offset") + _u64(k["area"]["size"], "area size")
            for k in meta["keyslots"].values()
        ]
    )
    offset = _align(used_end)
    new_id = str(max([-1] + [int(k) for k in meta["keyslots"]]) + 1)
    obj, area = make_keyslot(key, spec, offset)
    if offset + len(area) > ks_end:
        raise UsageError("no room for another keyslot in the keyslots area", src_s)
    meta["keyslots"][new_id] = obj
    digests = [d for d in meta["digests"].values() if slot in d["keyslots"]]
    for d in digests:
        d["keyslots"].append(new_id)
    if spec.token is not None:
        tid = str(max([-1] + [int(k) for k in meta["tokens"]]) + 1)
        meta["tokens"][tid] = dict(spec.token, keyslots=[new_id])
    region = build_header_copies(meta, seqid=h.seqid + 1, uuid=h.uuid, label=h.label, hdr_size=h.hdr_size)
    with atomic_output(dst, 0o600, overwrite=overwrite) as tmp:
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "r+b") as out:
                out.write(region)
                out.seek(offset)
                out.write(area)
                os.fchmod(out.fileno(), 0o644)
        except OSError as e:
            raise ResourceError(f"cannot write the output: {e.strerror}", str(dst)) from None
    return {
        "output": str(dst),
        "keyslot": int(new_id),
        "unlocked_with": int(slot),
        "seqid": h.seqid + 1,
        "token": spec.token is not None,
    }


def decrypt_image(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], passphrase: bytes, overwrite: bool = True
) -> dict[str, Any]:
    """Write the plaintext of the LUKS2 image ``src``'s data segment to the new file ``dst``."""
    src_s = str(src)
    try:
        fin = open(src, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFoundError("input image not found", src_s) from None
    with fin:
        h = read_header(fin, src_s)
        offset, ss = _segment_cipher(h)
        slot, key = unlock(h, fin, passphrase, src_s)
        total = os.fstat(fin.fileno()).st_size
        if h.segment.get("size") != "dynamic":
            total = min(total, offset + _u64(h.segment.get("size"), "segment size"))
        size = total - offset
        if size < 0 or size % ss:
            raise FormatError(f"the data segment ({size} bytes) is not whole {ss}-byte sectors", src_s)
        cipher = XtsCipher(key, ss)
        fin.seek(offset)
        with atomic_output(dst, 0o600, overwrite=overwrite) as tmp, open(tmp, "r+b") as out:
            buf = bytearray(CHUNK + 16)
            view = memoryview(buf)
            pos = 0
            with progress(size, "luks decrypt") as bar:
                while pos < size:
                    n = fin.readinto(view[: min(CHUNK, size - pos)])
                    if not n or n % ss:
                        raise FormatError("short read in the data segment", src_s)
                    crypt_units(cipher, view, n, pos, False)
                    out.write(view[:n])
                    pos += n
                    bar.update(n)
    return {"output": str(dst), "keyslot": int(slot), "data_size": size, "sector_size": ss}


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of the LUKS2 image ``path`` as a JSON-able summary (salts and digests left out)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise NotFoundError("image not found", str(path)) from None
    with f:
        h = read_header(f, str(path))
    m = h.metadata
    slots = {}
    for k, ks in m["keyslots"].items():
        kd = {x: y for x, y in (ks.get("kdf") or {}).items() if x != "salt"}
        slots[k] = {
            "type": ks.get("type"),
            "key_bits": 8 * int(ks.get("key_size", 0)),
            "kdf": kd,
            "af": ks.get("af"),
            "area": ks.get("area"),
        }
    tokens = {}
    for k, t in m["tokens"].items():
        tokens[k] = {x: y for x, y in t.items() if x != "tpm2-blob"}
    return {
        "path": str(path),
        "version": 2,
        "uuid": h.uuid,
        "label": h.label,
        "seqid": h.seqid,
        "hdr_size": h.hdr_size,
        "checksum": h.checksum_alg,
        "copies": h.copies,
        "segments": m["segments"],
        "keyslots": slots,
        "tokens": tokens,
        "digests": {
            k: {
                "type": d.get("type"),
                "hash": d.get("hash"),
                "keyslots": d.get("keyslots"),
                "segments": d.get("segments"),
            }
            for k, d in m["digests"].items()
        },
        "config": m["config"],
    }


__all__ = ["add_keyslot", "decrypt_image", "describe", "encrypt_image", "open_keyslot", "unlock"]
