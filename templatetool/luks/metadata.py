"""LUKS2 metadata: both header copies (binary header + JSON area) built and read back.

What we write (docs/formats/luks2.md): ``hdr_size`` 16 KiB (JSON area 12 KiB), the secondary copy
at 16 KiB, SHA-256 header checksums, the keyslots area from 32 KiB up to the data segment.
Reading follows the spec's recovery rule: each copy is checked (magic, version, size, offset,
checksum); the valid copy with the higher ``seqid`` wins; when the primary is damaged the
secondary is searched at every allowed ``hdr_size`` offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from construct import ConstructError

from ..canonical import no_duplicate_keys
from ..errors import FormatError, IntegrityError, UnsupportedError
from . import structs as S

#: Default header size (binary header + JSON area) and the keyslots area's start (2 copies).
HDR_SIZE = 16384
KEYSLOTS_OFFSET = 2 * HDR_SIZE
#: Default data segment offset: 16 MiB, as cryptsetup.
DATA_OFFSET = 16 << 20
#: Keyslot areas and the keyslots area are 4 KiB aligned (spec 3.2).
AREA_ALIGN = 4096


@dataclass
class LuksHeader:
    """A parsed, checksum-verified LUKS2 header and its JSON metadata."""

    hdr_size: int
    seqid: int
    uuid: str
    label: str
    subsystem: str
    checksum_alg: str
    metadata: dict[str, Any]
    copies: dict[str, bool] = field(default_factory=dict)  # "primary"/"secondary" -> valid

    @property
    def segment(self) -> dict[str, Any]:
        """The one data segment (``segments["0"]``)."""
        segs = self.metadata.get("segments") or {}
        if len(segs) != 1 or "0" not in segs:
            raise UnsupportedError(
                f"{len(segs)} data segments (a reencryption in progress?)",
                hint="only a single crypt segment is supported",
            )
        seg: dict[str, Any] = segs["0"]
        return seg

    @property
    def data_offset(self) -> int:
        return _u64(self.segment.get("offset"), "segment offset")


def _u64(v: object, what: str) -> int:
    """A LUKS2 JSON 64-bit number: a decimal string (spec 3.1)."""
    if isinstance(v, str) and v.isdigit():
        return int(v)
    raise FormatError(f"LUKS2 {what} is not a decimal string: {v!r}")


def _checksum(alg: str, area: bytes) -> bytes:
    if alg not in ("sha1", "sha256", "sha512"):
        raise UnsupportedError(f"LUKS2 header checksum {alg!r} is not supported")
    buf = bytearray(area)
    buf[S.CSUM_OFFSET : S.CSUM_OFFSET + S.CSUM_LEN] = bytes(S.CSUM_LEN)
    return hashlib.new(alg, buf).digest()


def build_header_copies(
    metadata: dict[str, Any], *, seqid: int = 1, uuid: str | None = None, label: str = "", hdr_size: int = HDR_SIZE
) -> bytes:
    """Both header copies (``2 * hdr_size`` bytes) for ``metadata``; ``config.json_size`` is set."""
    if hdr_size not in S.HDR_SIZES:
        raise FormatError(f"LUKS2 header size {hdr_size} is not allowed")
    json_size = hdr_size - S.BIN_HDR_SIZE
    config = metadata.setdefault("config", {})
    if not isinstance(config, dict):
        raise FormatError("LUKS2 metadata config is not an object")
    config["json_size"] = str(json_size)
    text = json.dumps(metadata, separators=(",", ":")).encode()
    if len(text) >= json_size:  # the area must keep at least one NUL after the text
        raise FormatError(f"LUKS2 JSON metadata is {len(text)} bytes, the area holds {json_size - 1}")
    jarea = text + bytes(json_size - len(text))
    uid = uuid or str(uuidlib.uuid4())
    out = bytearray()
    for magic, offset in ((S.MAGIC_PRIMARY, 0), (S.MAGIC_SECONDARY, hdr_size)):
        hdr = S.build_header(
            magic=magic,
            hdr_size=hdr_size,
            seqid=seqid,
            label=label,
            checksum_alg="sha256",
            salt=os.urandom(64),
            uuid=uid,
            subsystem="",
            hdr_offset=offset,
        )
        area = bytearray(hdr + jarea)
        area[S.CSUM_OFFSET : S.CSUM_OFFSET + 32] = _checksum("sha256", bytes(area))
        out += area
    return bytes(out)


def _parse_copy(f: BinaryIO, offset: int, magic: bytes) -> LuksHeader | None:
    """The copy at ``offset`` if it is valid, else None."""
    f.seek(offset)
    raw = f.read(S.BIN_HDR_SIZE)
    if len(raw) < S.BIN_HDR_SIZE or raw[:6] != magic:
        return None
    try:
        h = S.LuksBinaryHeader.parse(raw)
    except (ConstructError, UnicodeDecodeError):
        return None
    if h.hdr_size not in S.HDR_SIZES or h.hdr_offset != offset:
        return None
    f.seek(offset)
    area = f.read(h.hdr_size)
    if len(area) < h.hdr_size:
        return None
    alg = h.checksum_alg
    try:
        want = _checksum(alg, area)
    except UnsupportedError:
        return None
    if h.csum[: len(want)] != want:
        return None
    text = area[S.BIN_HDR_SIZE :].split(b"\0", 1)[0]
    try:
        meta = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except (ValueError, FormatError):
        return None
    if not isinstance(meta, dict):
        return None
    return LuksHeader(h.hdr_size, h.seqid, h.uuid, h.label, h.subsystem, alg, meta)


def read_header(f: BinaryIO, where: str = "") -> LuksHeader:
    """Read and verify the LUKS2 header of the open image ``f`` (FormatError if not LUKS2,
    IntegrityError if no copy verifies)."""
    f.seek(0)
    head = f.read(8)
    if head[:6] != S.MAGIC_PRIMARY and head[:6] != S.MAGIC_SECONDARY:
        raise FormatError("not a LUKS volume (no LUKS magic at offset 0)", where)
    if head[6:8] != S.VERSION.to_bytes(2, "big"):
        raise UnsupportedError(
            f"LUKS version {int.from_bytes(head[6:8], 'big')} is not supported", where, "only LUKS2 is read"
        )
    primary = _parse_copy(f, 0, S.MAGIC_PRIMARY)
    offsets = [primary.hdr_size] if primary else list(S.HDR_SIZES)
    secondary = None
    for off in offsets:
        secondary = _parse_copy(f, off, S.MAGIC_SECONDARY)
        if secondary:
            break
    best = max((c for c in (primary, secondary) if c), key=lambda c: c.seqid, default=None)
    if best is None:
        raise IntegrityError(
            "neither LUKS2 header copy verifies (checksum, magic or size)", where, "the header is damaged"
        )
    best.copies = {"primary": primary is not None, "secondary": secondary is not None}
    _validate(best, where)
    return best


def _obj(d: Any, key: str, where: str) -> dict[str, Any]:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, dict):
        raise FormatError(f"LUKS2 {where}.{key} is not an object")
    return v


def _typed(d: dict[str, Any], key: str, kind: type, where: str, optional: bool = False) -> None:
    v = d.get(key)
    if v is None and optional:
        return
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise FormatError(f"LUKS2 {where}.{key} is not a {kind.__name__}")


def _str_list(d: dict[str, Any], key: str, where: str) -> None:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise FormatError(f"LUKS2 {where}.{key} is not a list of strings")


def _validate(h: LuksHeader, where: str) -> None:
    """Type checks of every JSON field the reader uses (cryptsetup checks more), so a hostile
    header is a FormatError, never a crash further on."""
    m = h.metadata
    for k in ("keyslots", "segments", "digests", "config", "tokens"):
        _obj(m, k, "metadata")
    if _u64(m["config"].get("json_size"), "config.json_size") != h.hdr_size - S.BIN_HDR_SIZE:
        raise FormatError("LUKS2 config.json_size does not match the header size", where)
    ks_size = _u64(m["config"].get("keyslots_size"), "config.keyslots_size")
    end = 2 * h.hdr_size + ks_size
    for section in ("keyslots", "segments", "digests", "tokens"):
        for name in m[section]:
            if not name.isdigit():
                raise FormatError(f"LUKS2 {section} id {name!r} is not a number", where)
            _obj(m[section], name, section)
    for name, ks in m["keyslots"].items():
        w = f"keyslots.{name}"
        _typed(ks, "type", str, w)
        _typed(ks, "key_size", int, w)
        af, area, kdf = _obj(ks, "af", w), _obj(ks, "area", w), _obj(ks, "kdf", w)
        for k, t in (("type", str), ("stripes", int), ("hash", str)):
            _typed(af, k, t, w + ".af")
        for k, t in (("type", str), ("encryption", str), ("key_size", int)):
            _typed(area, k, t, w + ".area")
        _typed(kdf, "type", str, w + ".kdf")
        _typed(kdf, "salt", str, w + ".kdf")
        for k in ("iterations", "time", "memory", "cpus"):
            _typed(kdf, k, int, w + ".kdf", optional=True)
        _typed(kdf, "hash", str, w + ".kdf", optional=True)
        off, size = _u64(area.get("offset"), w + ".area.offset"), _u64(area.get("size"), w + ".area.size")
        if off < 2 * h.hdr_size or off + size > end:
            raise FormatError(f"LUKS2 keyslot {name} area lies outside the keyslots area", where)
    for name, seg in m["segments"].items():
        w = f"segments.{name}"
        for k in ("type", "offset", "size"):
            _typed(seg, k, str, w)
        if seg["type"] == "crypt":  # a "linear" segment (left by a decryption) has neither
            _typed(seg, "encryption", str, w)
            _typed(seg, "sector_size", int, w)
        _typed(seg, "iv_tweak", str, w, optional=True)
    for name, dg in m["digests"].items():
        w = f"digests.{name}"
        _str_list(dg, "keyslots", w)
        _str_list(dg, "segments", w)
        for k in ("type", "hash", "salt", "digest"):
            _typed(dg, k, str, w)
        _typed(dg, "iterations", int, w)
    for name, tok in m["tokens"].items():
        _typed(tok, "type", str, f"tokens.{name}")
        _str_list(tok, "keyslots", f"tokens.{name}")
