"""Resumable in-place BitLocker conversion of an NTFS volume that already carries the reservation.

The volume is converted from its start to its end, one small step at a time, the way BitLocker
converts online; a crash (SIGKILL, power cut) at any instant leaves every sector either
ciphertext the metadata/journal describe or plaintext, and :func:`resume_conversion` finishes.

Layout during the conversion (inside BitLocker's own reserved regions, which NTFS never sees, and
the journal area):

* metadata region *i* (64 KiB): the FVE metadata block in its first 16 KiB (state 2/2 =
  switching, StateOffset = bytes converted at the last checkpoint), and from 16 KiB a **journal
  slot** (regions 1 and 2: slots 0 and 1, used alternately): a 4 KiB header (magic, volume GUID,
  sequence number, offset, length, SHA-256 over header and data) followed by the plaintext of
  the step being converted (at most 44 KiB).
* the relocated-header region holds the encrypted first 8 KiB from the start (before sector 0
  changes).
* the **journal area** (when the volume has one): a run of free clusters reading as zeros; its
  halves 0 and 1 hold the plaintext of the steps of slots 0 and 1 (the slot then holds only the
  header), so steps are MiBs (one fsync each) instead of 44 KiB. The area is encrypted last,
  with zeros as its known plaintext, after a record flagged "steps done".

Forked workers (:meth:`templatetool.parallel.Engine.map`) read, encrypt and hash the steps
ahead; this process alone writes, in order.

Per step ``[X, X+n)``: journal record (plaintext) -> fsync -> ciphertext (made durable by the
next record's fsync). Every second or so the three metadata copies are rewritten one after the
other, each fsynced, with StateOffset = the converted boundary. A durable record for step *k*
proves that step *k-1* finished (its ciphertext was written before the fsync that made record *k*
durable) and that nothing after step *k* was touched; resume therefore redoes the steps of both
valid slots (the newest two) from their plaintext (idempotent) and continues at
``max(StateOffset, end of the newest step)``. A torn record fails its SHA-256 and the other slot
describes the state. At the end every copy first says "all converted" (state 2, StateOffset =
volume size), then the three copies are rewritten whole (state 4/4), which also wipes the
journal: the result is a normal, fully encrypted volume.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from ..blockdev import BlockDevice, is_zero
from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    PolicyError,
    TemplateToolError,
    UnsupportedError,
    UsageError,
)
from ..parallel import Engine, SkipFn, default_engine
from ..progress import progress
from . import structs as S
from .metadata import (
    Metadata,
    build_boot_sector,
    parse_boot_sector,
    parse_metadata_block,
)
from .reserve import find_reserved
from .volume import (
    EncryptionPlan,
    EncryptResult,
    FveRegions,
    FveVolume,
    ProtectorSpec,
    plan_encryption,
    plan_from_metadata,
)

# ---- on-disk journal record (our own format; readers zero these regions) --------------------------
#: Where the journal slot starts inside a 64 KiB metadata region (the metadata block must fit before).
JOURNAL_START = 16 * 1024
#: Journal header size (one sector of the largest supported size, so data stays sector aligned).
JOURNAL_HEADER = 4096
#: Largest step: what fits in a slot after the header.
MAX_STEP = S.METADATA_REGION_SIZE - JOURNAL_START - JOURNAL_HEADER
JOURNAL_MAGIC = b"TTFVEJL2"
#: Environment variable that overrides the step size (bytes; tests use it to get many steps).
CHUNK_ENV = "TEMPLATETOOL_INPLACE_CHUNK"
#: Default step when a journal area is found (each step costs one fsync).
AREA_STEP = 4 << 20
#: Largest step the environment may ask for.
MAX_AREA_STEP = 16 << 20
#: Seconds between metadata checkpoints (the journal makes checkpoints optional for safety).
CHECKPOINT_SECONDS = 1.0
#: ... or after this many steps, whichever comes first.
CHECKPOINT_STEPS = 1 << 30
STATE_SWITCHING = 2
#: Journal record flag: the last record of a run with a journal area; redoing it encrypts the
#: (all-zero) area itself.
FLAG_AREA_DONE = 1
#: Journal record flag: the step's plaintext is all zeros (no data stored).
FLAG_ZERO = 2

JournalHeader = Struct(
    "magic" / Const(JOURNAL_MAGIC),
    "volume_guid" / Bytes(16),
    "seq" / Int64ul,
    "offset" / Int64ul,
    "length" / Int32ul,
    "flags" / Int32ul,
    "data_offset" / Int64ul,  # 0: the data follows the header in the slot; else: where it is
    "area_offset" / Int64ul,  # the journal area of this run (0/0: none)
    "area_size" / Int64ul,
    "digest" / Bytes(32),
)
_JH_LEN = JournalHeader.sizeof()


@dataclass
class JournalRecord:
    """A valid journal record: plaintext of the step ``[offset, offset+length)``.

    ``area``: the run's journal area ``(offset, size)`` or None; ``flags`` & FLAG_AREA_DONE marks
    the record written once every step is converted (redoing it encrypts the area)."""

    slot: int
    seq: int
    offset: int
    data: bytes = field(repr=False)
    area: tuple[int, int] | None = None
    flags: int = 0


def _header(
    guid: bytes,
    seq: int,
    offset: int,
    length: int,
    flags: int,
    data_offset: int,
    area: tuple[int, int] | None,
    digest: bytes,
) -> bytes:
    ao, an = area or (0, 0)
    header: bytes = JournalHeader.build(
        {
            "volume_guid": guid,
            "seq": seq,
            "offset": offset,
            "length": length,
            "flags": flags,
            "data_offset": data_offset,
            "area_offset": ao,
            "area_size": an,
            "digest": digest,
        }
    )
    return header


def _journal_digest(
    guid: bytes,
    seq: int,
    offset: int,
    data: bytes | memoryview,
    flags: int = 0,
    data_offset: int = 0,
    area: tuple[int, int] | None = None,
    data_hash: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """SHA-256 over the header (digest zero) and the SHA-256 of the data (none for a zero step);
    ``data_hash`` when the data's SHA-256 is already known (the workers compute it)."""
    n = len(data) if length is None else length
    if flags & FLAG_ZERO:
        data_hash = b""
    elif data_hash is None:
        data_hash = hashlib.sha256(data).digest()
    return hashlib.sha256(_header(guid, seq, offset, n, flags, data_offset, area, bytes(32)) + data_hash).digest()


def build_journal(
    guid: uuid.UUID,
    seq: int,
    offset: int,
    data: bytes | memoryview,
    *,
    flags: int = 0,
    data_offset: int = 0,
    area: tuple[int, int] | None = None,
    data_hash: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """Header (padded to 4 KiB) + data of one journal record.

    With ``data_offset`` the data is stored there (in the journal area) and only the header is
    returned; with ``flags`` & FLAG_ZERO the step of ``length`` bytes is all zeros and no data is
    stored. The digest covers header and data wherever they are."""
    n = len(data) if length is None else length
    if not data_offset and not flags & FLAG_ZERO and n > MAX_STEP:
        raise UsageError(f"journal step of {n} bytes exceeds {MAX_STEP}")
    g = guid.bytes_le
    head = _header(
        g,
        seq,
        offset,
        n,
        flags,
        data_offset,
        area,
        _journal_digest(g, seq, offset, data, flags, data_offset, area, data_hash, n),
    )
    inline = b"" if data_offset or flags & FLAG_ZERO else bytes(data)
    return head.ljust(JOURNAL_HEADER, b"\0") + inline


def read_journal(dev: BlockDevice, regions: FveRegions, guid: uuid.UUID) -> JournalRecord | None:
    """The newest valid journal record of this volume (None when no slot holds one)."""
    recs = read_journals(dev, regions, guid)
    return recs[-1] if recs else None


def read_journals(dev: BlockDevice, regions: FveRegions, guid: uuid.UUID) -> list[JournalRecord]:
    """Every valid journal record of this volume (0, 1 or 2), oldest first."""
    out: list[JournalRecord] = []
    for slot in (0, 1):
        base = regions.metadata_offsets[slot] + JOURNAL_START
        head = dev.read(base, JOURNAL_HEADER)
        if head[:8] != JOURNAL_MAGIC:
            continue
        h = JournalHeader.parse(head[:_JH_LEN])
        area = (h.area_offset, h.area_size) if h.area_size else None
        if h.volume_guid != guid.bytes_le or h.offset + h.length > dev.size:
            continue
        if area is not None and area[0] + area[1] > dev.size:
            continue
        if h.flags & FLAG_ZERO:
            if h.data_offset or h.length > MAX_AREA_STEP:
                continue
            data = bytes(h.length)
        elif h.data_offset:
            if area is None or not (area[0] <= h.data_offset and h.data_offset + h.length <= area[0] + area[1]):
                continue
            data = dev.read(h.data_offset, h.length)
        else:
            if h.length > MAX_STEP:
                continue
            data = dev.read(base + JOURNAL_HEADER, h.length)
        if _journal_digest(h.volume_guid, h.seq, h.offset, data, h.flags, h.data_offset, area) != h.digest:
            continue  # torn or stale write: the other slot describes the state
        out.append(JournalRecord(slot, h.seq, h.offset, data, area, h.flags))
    return sorted(out, key=lambda r: r.seq)


_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


def _is_zero(b: bytes) -> bool:
    return is_zero(b)


def find_area(view: BlockDevice, sizes: list[int], avoid: list[tuple[int, int]]) -> tuple[tuple[int, int], int] | None:
    """A journal area: ``(offset, size)`` of at least ``sizes[k]`` bytes of the volume that read
    as zeros, away from ``avoid`` (the head and BitLocker's regions), and ``k`` (the first size
    of ``sizes`` found). Candidates are runs of free clusters in the NTFS $Bitmap, from the end
    of the volume; each is read and must be all zeros, because the conversion ends by writing
    the ciphertext of zeros over the area (so its plaintext stays what it was). None when there
    is no such run (the journal then stays in the metadata regions' slots)."""
    import numpy as np

    from ..catalog.ntfs import ntfs_free_map

    try:
        fm = ntfs_free_map(view)
    except TemplateToolError:
        return None
    cs = fm.cluster_size
    for k, size in enumerate(sizes):
        per = -(-(-(-size // cs)) // 8) * 8  # noqa: B002 - clusters rounded up to a multiple of 8 (bitmap bytes)
        win = per * cs
        used = fm.any_used_per(per, view.size // win)
        if used is None:
            continue
        tried = 0
        for i in np.flatnonzero(~used)[::-1]:
            off = int(i) * win
            if any(off < o + n and o < off + win for o, n in avoid):
                continue
            tried += 1
            if tried > 8:
                break
            if all(_is_zero(view.read(p, min(1 << 20, off + win - p))) for p in range(off, off + win, 1 << 20)):
                return (off, win), k
    return None


# ---- probing ----------------------------------------------------------------------------------------
@dataclass
class InPlaceStatus:
    """What a volume is, as far as in-place conversion is concerned.

    ``state``: ``plain`` (NTFS with the reservation, not started), ``unreserved`` (NTFS without
    it), ``converting`` (started, not finished: resumable), ``encrypted`` (complete BitLocker),
    ``other`` (anything else).
    """

    state: str
    regions: FveRegions | None = None
    copies: list[Metadata] = field(default_factory=list, repr=False)
    encrypted_size: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "encrypted_size": self.encrypted_size, "detail": self.detail}


def _parse_copies(view: BlockDevice, offsets: tuple[int, int, int]) -> list[Metadata]:
    out = []
    for i, off in enumerate(offsets):
        if off < 0 or off + S.METADATA_REGION_SIZE > view.size:
            continue
        try:
            m = parse_metadata_block(view.read(off, S.METADATA_REGION_SIZE), off, view.size, i + 1)
        except TemplateToolError:
            continue
        if m.metadata_offsets == offsets:
            out.append(m)
    return out


def probe(view: BlockDevice) -> InPlaceStatus:
    """Classify ``view`` (a volume window) for :func:`encrypt_in_place` / :func:`resume_in_place`."""
    head = view.read(0, 512) if view.size >= 512 else b""
    if head[3:11] == S.FVE_SIGNATURE:
        boot = parse_boot_sector(head, view.size, f"{view.name}: FVE volume header")
        copies = _parse_copies(view, tuple(boot.metadata_offsets))  # type: ignore[arg-type]
        if not copies:
            raise FormatError("no valid FVE metadata copy", view.name, "the volume metadata is corrupt")
        m = max(copies, key=lambda c: c.encrypted_size)
        regions = FveRegions(m.metadata_offsets, m.vho_offset, m.vho_size or m.virtualized_sectors * boot.sector_size)
        done = all(c.current_state == S.STATE_ENCRYPTED and c.encrypted_size >= view.size for c in copies)
        if done and len(copies) == 3:
            return InPlaceStatus("encrypted", regions, copies, m.encrypted_size)
        return InPlaceStatus("converting", regions, copies, m.encrypted_size, "FVE header written")
    if head[3:11] == b"NTFS    ":
        reserved = find_reserved(view)
        if reserved is None:
            return InPlaceStatus("unreserved", detail="NTFS without the BitLocker reservation")
        copies = _parse_copies(view, reserved.metadata_offsets)
        if copies:
            m = max(copies, key=lambda c: c.encrypted_size)
            if m.vho_offset != reserved.vho_offset:
                raise FormatError("FVE metadata in the reserved regions does not match the reservation", view.name)
            return InPlaceStatus("converting", reserved, copies, m.encrypted_size, "FVE header not yet written")
        return InPlaceStatus("plain", reserved)
    return InPlaceStatus("other", detail="neither NTFS nor BitLocker")


# ---- the converter ------------------------------------------------------------------------------
def step_size(sector_size: int, engine: Engine | None = None) -> int:
    """The wanted conversion step: the engine's ``step`` (the CLI: $TEMPLATETOOL_INPLACE_CHUNK)
    or :data:`AREA_STEP`.

    Without a journal area the step is cut to what fits a metadata-region slot (:data:`MAX_STEP`)."""
    n = (engine or default_engine()).step
    if n is None:
        return AREA_STEP
    if n <= 0 or n % sector_size or n > MAX_AREA_STEP:
        raise UsageError(
            f"in-place step {n}: must be a multiple of the sector size {sector_size} and at most {MAX_AREA_STEP}",
            hint=f"set {CHUNK_ENV} accordingly",
        )
    return n


def _inline_step(step: int, sector_size: int) -> int:
    return min(step, MAX_STEP // sector_size * sector_size)


def _boot_sector(plain_head: bytes, ss: int, regions: FveRegions, vsize: int) -> bytes:
    """The FVE volume header replacing the first sectors (as plan_encryption builds it)."""
    is_ntfs = plain_head[3:11] == b"NTFS    "
    hidden = struct.unpack_from("<I", plain_head, 0x1C)[0] if is_ntfs else 0
    spc = plain_head[0x0D] if is_ntfs and plain_head[0x0D] else 8
    return build_boot_sector(
        ss,
        regions.metadata_offsets,
        hidden_sectors=hidden,
        sectors_per_cluster=spc,
        total_sectors=0 if is_ntfs else vsize // ss,
    ).ljust(regions.vho_size, b"\0")


class _Converter:
    """Drives the ordered writes for one volume; ``dev`` is the volume window (writable).

    ``area``: the journal area (``(offset, size)``, two slots of ``size // 2`` bytes holding the
    plaintext of the steps; all zeros before the run) or None (the plaintext stays in the
    metadata regions' slots, steps of at most :data:`MAX_STEP`)."""

    def __init__(
        self,
        dev: BlockDevice,
        plan: EncryptionPlan,
        guid: uuid.UUID,
        seq: int,
        area: tuple[int, int] | None = None,
        step: int | None = None,
        engine: Engine | None = None,
        skip: SkipFn | None = None,
    ) -> None:
        self.engine = engine or default_engine()
        self.skip_free = skip
        self.dev = dev
        self.plan = plan
        self.regions = plan.regions
        self.ss = plan.sector_size
        self.vsize = plan.volume_size
        self.guid = guid
        self.seq = seq
        self.area = area
        want = step if step is not None else step_size(self.ss, self.engine)
        if area is None:
            self.step = _inline_step(want, self.ss)
        else:
            self.step = min(want, area[1] // 2 // self.ss * self.ss)
        self.reserved = sorted(
            [(o, S.METADATA_REGION_SIZE) for o in self.regions.metadata_offsets]
            + [(self.regions.vho_offset, self.regions.vho_size)]
        )
        # what the ciphertext writes of the steps leave alone (the area is encrypted last)
        self.skip = sorted(self.reserved + ([area] if area else []))
        self.checkpoints = 0
        self.steps = 0
        self.skipped = 0

    def sync(self) -> None:
        self.dev.flush()

    # -- writes ------------------------------------------------------------------
    def write_journal(
        self, offset: int, data: bytes | memoryview, flags: int = 0, data_hash: bytes | None = None
    ) -> None:
        """Make the record of a step durable (data in the area's slot, or inline), then count it.

        ``data_hash``: the data's SHA-256 when known; ``flags`` & FLAG_ZERO: ``data`` is all zeros
        and is not stored."""
        slot = self.seq % 2
        head_at = self.regions.metadata_offsets[slot] + JOURNAL_START
        data_offset = 0
        if self.area is not None and len(data) and offset and not flags & FLAG_ZERO:
            # (the head's record stays inline: until the metadata exists, nothing outside
            # BitLocker's regions may change)
            data_offset = self.area[0] + slot * (self.area[1] // 2)
            self.dev.write(data_offset, data)
        rec = build_journal(
            self.guid,
            self.seq,
            offset,
            data,
            flags=flags,
            data_offset=data_offset,
            area=self.area,
            data_hash=data_hash,
            length=len(data),
        )
        self.dev.write(head_at, rec)
        self.sync()
        self.seq += 1

    def write_metadata(self, encrypted_size: int, final: bool = False) -> None:
        """Rewrite the three copies one after the other, each made durable before the next."""
        state = S.STATE_ENCRYPTED if final else STATE_SWITCHING
        block = self.plan.metadata_block(encrypted_size=encrypted_size, state=state)
        if any(block[JOURNAL_START:]):
            raise UnsupportedError(
                "the FVE metadata is too large to leave room for the conversion journal",
                self.dev.name,
                "use fewer key protectors",
            )
        data = block if final else block[:JOURNAL_START]
        for off in self.regions.metadata_offsets:
            self.dev.write(off, data)
            self.sync()
        self.checkpoints += 1

    def _write_skipping(self, offset: int, ct: bytes | memoryview) -> None:
        """Write the ciphertext ``ct`` of the step at ``offset``, leaving ``self.skip`` alone."""
        mv = memoryview(ct)
        end = offset + len(mv)
        pos = offset
        for ro, rn in self.skip:
            if ro + rn <= pos or ro >= end:
                continue
            if ro > pos:
                self.dev.write(pos, mv[pos - offset : ro - offset])
            pos = max(pos, ro + rn)
        if pos < end:
            self.dev.write(pos, mv[pos - offset :])

    def write_ciphertext(self, offset: int, plain: bytes, sync: bool = True) -> None:
        """Encrypt ``plain`` (the step at ``offset``) and write it, skipping BitLocker's regions
        and the journal area. Without ``sync`` the write becomes durable with the next fsync."""
        self._write_skipping(offset, self.plan.cipher.encrypt(plain, offset // self.ss))
        if sync:
            self.sync()

    def encrypt_area(self) -> None:
        """Write the ciphertext of zeros (the area's plaintext) over the journal area; durable."""
        if self.area is None:
            return
        ao, an = self.area
        for p in range(ao, ao + an, 1 << 20):
            n = min(1 << 20, ao + an - p)
            self.dev.write(p, self.plan.cipher.encrypt(bytes(n), p // self.ss))
        self.sync()

    def write_head(self, plain_head: bytes) -> None:
        """Step 0: relocated header (encrypted first sectors) and the FVE volume header."""
        r = self.regions
        self.dev.write(r.vho_offset, self.plan.cipher.encrypt(plain_head, r.vho_offset // self.ss))
        self.sync()
        self.dev.write(0, _boot_sector(plain_head, self.ss, r, self.vsize))
        self.sync()

    # -- the loop ----------------------------------------------------------------
    def _items(self, start: int) -> Iterator[tuple[int, int, bool]]:
        ao, an = self.area or (0, 0)
        free = self.skip_free
        for pos in range(start, self.vsize, self.step):
            n = min(self.step, self.vsize - pos)
            if ao <= pos and pos + n <= ao + an:  # wholly in the area: encrypted last
                yield pos, n, False
            elif free is not None and free(pos, n):  # used space only: a free hole stays as it is
                self.skipped += n
                yield pos, n, False
            else:
                yield pos, n, True

    def _chunk(self, off: int, n: int, out: memoryview) -> bytes:
        """Worker side: the plaintext of the step into ``out[:n]``, its ciphertext into ``out[n:2n]``."""
        plain = out[:n]
        self.dev.read_into(off, plain)
        for ro, rn in self.skip:  # never written by this step, and this process changes them meanwhile
            lo, hi = max(off, ro), min(off + n, ro + rn)  # (journal, checkpoints): zeros, so that
            if lo < hi:  # every run journals the same bytes
                plain[lo - off : hi - off] = _zeros(hi - lo)
        self.plan.cipher.encrypt_into(plain, off // self.ss, out[n:])
        if is_zero(plain):
            return b""  # a zero step: its record stores no data
        return hashlib.sha256(plain).digest()

    def run(self, start: int) -> None:
        """Convert ``[start, volume end)`` then the journal area, then write the final metadata.

        The engine's forked workers (:meth:`Engine.map`) read and encrypt the steps ahead; this process alone
        writes, in order, each step's journal record (durable) before its ciphertext."""
        last = time.monotonic()
        since = 0
        with progress(self.vsize - start, "encrypt in place") as bar:
            for off, n, out, payload in self.engine.map(self._chunk, self._items(start), slot=2 * self.step):
                if out is not None:
                    # The journal's fsync also makes the previous step's ciphertext durable, which is
                    # why resume redoes both journal slots (the newest two steps).
                    if payload:
                        self.write_journal(off, out[:n], data_hash=payload)
                    else:
                        self.write_journal(off, out[:n], flags=FLAG_ZERO)
                    self._write_skipping(off, out[n : 2 * n])
                    self.steps += 1
                    since += 1
                bar.update(n)
                pos = off + n
                now = time.monotonic()
                if (now - last >= CHECKPOINT_SECONDS or since >= CHECKPOINT_STEPS) and pos < self.vsize:
                    self.write_metadata(pos)
                    last, since = now, 0
        self.sync()
        if self.area is not None:
            # Record that every step is done (this record's fsync makes the last ciphertext durable),
            # then the area's own plaintext (zeros) is encrypted over the journal data.
            self.write_journal(self.area[0], b"", flags=FLAG_AREA_DONE)
            self.encrypt_area()
        # Every copy must say "all converted" before the final blocks wipe the journal slots.
        self.write_metadata(self.vsize)
        self.write_metadata(self.vsize, final=True)


class _MetaFve(FveVolume):
    """An FveVolume built from one parsed metadata copy (the FVE header may not be written yet)."""

    def __init__(self, dev: BlockDevice, meta: Metadata, sector_size: int) -> None:
        self.dev = dev
        self.name = dev.name
        self.meta = meta
        self.valid_metas = [meta]
        self.copies = []
        self.boot = None  # type: ignore[assignment]
        self.sector_size = sector_size
        self.method = meta.method
        self.vho_size = meta.vho_size or meta.virtualized_sectors * sector_size


@dataclass
class InPlaceResult:
    """What one in-place run did."""

    resumed: bool
    started_at: int
    volume_size: int
    steps: int
    checkpoints: int
    result: EncryptResult
    #: bytes left as they were (free in NTFS and unallocated: ``used_space_only``)
    skipped_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        d = self.result.to_json()
        d.update(
            {
                "resumed": self.resumed,
                "started_at": self.started_at,
                "steps": self.steps,
                "checkpoints": self.checkpoints,
                "skipped_bytes": self.skipped_bytes,
            }
        )
        return d


def _sector_size(view: BlockDevice) -> int:
    head = view.read(0, 512)
    ss: int = struct.unpack_from("<H", head, 0x0B)[0]
    if ss not in (512, 1024, 2048, 4096):
        raise FormatError(f"unsupported sector size {ss} in the volume header", view.name)
    return ss


def start_conversion(
    view: BlockDevice,
    *,
    protectors: list[ProtectorSpec],
    method: str | int = "xts-aes-128",
    description: str | None = None,
    on_keys: Callable[[EncryptResult], None] | None = None,
    engine: Engine | None = None,
    skip: SkipFn | None = None,
) -> InPlaceResult:
    """Convert the reserved NTFS volume ``view`` (writable) to BitLocker in place (on ``engine``).

    ``on_keys(result)`` runs once the keys exist and before the first byte is written: the caller
    must store the recovery password / startup key durably there (a crash later needs them).
    ``skip(offset, length)`` (used space only): steps it declares free (free in the filesystem
    and unallocated, so reading as zeros: nothing to protect) are neither journaled nor written;
    readers decrypt them to noise, as in any free space. A resume converts every step it redoes.
    """
    st = probe(view)
    _refuse(st, view, fresh=True)
    assert st.regions is not None
    plan = plan_encryption(
        view, method=method, protectors=protectors, regions=st.regions, description=description, engine=engine
    )
    if any(plan.metadata_block(state=STATE_SWITCHING)[JOURNAL_START:]):
        raise UnsupportedError(
            "the FVE metadata is too large to leave room for the conversion journal",
            view.name,
            "use fewer key protectors",
        )
    if on_keys is not None:
        on_keys(plan.result)
    r = plan.regions
    ss = plan.sector_size
    want = step_size(ss, engine)
    sizes = [want]
    while sizes[-1] > MAX_STEP:  # a smaller area when no run of zeros is large enough
        sizes.append(max(ss, sizes[-1] // 2 // ss * ss))
    area = None
    found = find_area(view, [2 * w for w in sizes], [(0, r.vho_size), *r.spans()])
    if found is not None:
        area, k = found
        want = sizes[k]
    conv = _Converter(view, plan, uuid.UUID(plan.result.volume_guid), 0, area=area, step=want, engine=engine, skip=skip)
    head = view.read(0, r.vho_size)
    # 1. relocated header (reserved region, invisible to NTFS); 2. journal of the first step;
    # 3. metadata (state switching); 4. the FVE volume header over the first sectors.
    view.write(r.vho_offset, plan.cipher.encrypt(head, r.vho_offset // conv.ss))
    conv.sync()
    conv.write_journal(0, head)
    conv.write_metadata(r.vho_size)
    conv.write_head(head)
    conv.run(r.vho_size)
    return InPlaceResult(False, 0, plan.volume_size, conv.steps, conv.checkpoints, plan.result, conv.skipped)


def _refuse(st: InPlaceStatus, view: BlockDevice, fresh: bool) -> None:
    if not fresh and st.state in ("plain", "unreserved", "other"):
        raise UsageError(
            "the volume is not being converted",
            view.name,
            "start an in-place encryption first",
            code="bitlocker.not-converting",
        )
    if st.state == "encrypted":
        raise UsageError("the volume is already fully BitLocker-encrypted", view.name, "nothing to do")
    if st.state == "unreserved":
        raise PolicyError(
            "the NTFS volume has no BitLocker reservation (FVE2 files), so it cannot be converted in place",
            view.name,
            "run `templatetool protect` (or `templatetool encrypt -o NEW` to copy) first",
        )
    if st.state == "other":
        raise UnsupportedError(f"the volume is {st.detail}", view.name, "in-place encryption converts NTFS volumes")
    if fresh and st.state == "converting":
        raise UsageError(
            "the volume is in the middle of an in-place conversion",
            view.name,
            "run `templatetool resume DISK` with its credential",
        )


def resume_conversion(view: BlockDevice, credential: dict[str, Any], engine: Engine | None = None) -> InPlaceResult:
    """Finish an interrupted in-place conversion of ``view`` (writable), on ``engine``.

    ``credential``: one of ``recovery_password``, ``password``, ``bek`` (as for ``unlock``).
    The step recorded in the newest valid journal record is redone from its plaintext, then the
    conversion continues from ``max(StateOffset, end of that step)``.
    """
    st = probe(view)
    _refuse(st, view, fresh=False)
    assert st.regions is not None
    ss = _sector_size(view)
    copies = st.copies
    fve = _MetaFve(view, copies[0], ss)
    vmk = fve.recover_vmk(**{k: v for k, v in credential.items() if v is not None})
    good: list[tuple[Metadata, bytes]] = []
    for c in copies:  # check each copy on its own: the one with the largest StateOffset wins
        fve.meta = c
        fve.valid_metas = [c]
        try:
            good.append((c, fve.fvek(vmk)))
        except IntegrityError:
            continue
    if not good:
        raise IntegrityError("no FVE metadata copy verifies under the VMK", view.name, "the metadata was altered")
    m, fvek = max(good, key=lambda cf: cf[0].encrypted_size)
    vho_size = m.vho_size or m.virtualized_sectors * ss
    plan = plan_from_metadata(m, vmk, fvek, volume_size=view.size, sector_size=ss, vho_size=vho_size)
    records = read_journals(view, plan.regions, m.volume_guid)
    journal = records[-1] if records else None
    conv = _Converter(
        view,
        plan,
        m.volume_guid,
        journal.seq + 1 if journal else 0,
        area=journal.area if journal else None,
        engine=engine,
    )
    if m.encrypted_size >= view.size:
        conv.write_metadata(view.size, final=True)  # interrupted while writing the final copies
        return InPlaceResult(True, view.size, view.size, 0, conv.checkpoints, plan.result)
    if journal is None:
        raise UnsupportedError(
            "the volume is mid-conversion but holds no templatetool conversion journal",
            view.name,
            "finish the conversion with the tool that started it",
        )
    for rec in records:  # redo the newest two steps from their plaintext (idempotent)
        if rec.flags & FLAG_AREA_DONE:
            conv.encrypt_area()
        elif rec.offset == 0:
            if len(rec.data) != vho_size:
                raise FormatError("first journal record has the wrong size", view.name)
            conv.write_head(rec.data)
        else:
            conv.write_ciphertext(rec.offset, rec.data)
    boundary = max(m.encrypted_size, journal.offset + len(journal.data))
    if journal.flags & FLAG_AREA_DONE:
        boundary = view.size
    conv.write_metadata(boundary)
    conv.run(boundary)
    return InPlaceResult(True, boundary, view.size, conv.steps, conv.checkpoints, plan.result)


def conversion_pending(view: BlockDevice) -> bool:
    """True when ``view`` is in the middle of a templatetool in-place conversion (our journal is
    present): its plaintext view is not complete until `resume` finishes (no credential needed)."""
    if view.size < 512 or view.read(0, 512)[3:11] != S.FVE_SIGNATURE:
        return False  # not BitLocker yet: `decrypt` reports that itself
    try:
        st = probe(view)
    except TemplateToolError:
        return False
    if st.state != "converting" or st.regions is None:
        return False
    return bool(read_journals(view, st.regions, st.copies[0].volume_guid))


def refuse_if_converting(disk_path: str | os.PathLike[str], partition: int | None = None) -> None:
    """Raise UsageError when the BitLocker volume of the disk is mid-conversion (for `decrypt`)."""
    from ..blockdev import View
    from ..disk import open_disk

    dev = open_disk(disk_path)
    try:
        try:
            off, size, _ = _locate(dev, partition)
        except TemplateToolError:
            return  # the caller reports a missing/odd volume itself
        view = View(dev, off, size, name=f"{disk_path} volume@{off}")
        if conversion_pending(view):
            raise UsageError(
                "the volume is in the middle of an in-place conversion",
                view.name,
                "finish it with `templatetool resume DISK` first",
            )
    finally:
        dev.close()


# ---- disk level ------------------------------------------------------------------------------------
class _Lock:
    """An exclusive advisory lock on the disk file for the whole run (released by the kernel on death)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..errors import ResourceError

        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ResourceError(f"cannot open: {e.strerror}", str(path)) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise ResourceError(
                "another process is converting this disk",
                str(path),
                "wait for it to finish (or for it to die), then resume",
            ) from None

    def close(self) -> None:
        os.close(self.fd)


def _locate(dev: BlockDevice, partition: int | None) -> tuple[int, int, int | None]:
    """(offset, size, index) of the NTFS/BitLocker volume to convert (the copy-mode choice)."""
    from ..disk import locate_volume

    return locate_volume(dev, partition, ("ntfs", "bitlocker"))


def in_place(
    disk_path: str | os.PathLike[str],
    partition: int | None = None,
    *,
    protectors: list[ProtectorSpec] | None = None,
    method: str | int = "xts-aes-128",
    description: str | None = None,
    credential: dict[str, Any] | None = None,
    on_keys: Callable[[EncryptResult], None] | None = None,
    resume_only: bool = False,
    engine: Engine | None = None,
    free_space: Callable[[BlockDevice], SkipFn | None] | None = None,
) -> dict[str, Any]:
    """Encrypt (or finish encrypting) the OS volume of a raw or VHDX disk in place.

    A volume that is not started is converted with fresh keys from ``protectors`` (refused with
    ``resume_only``); a volume in the middle of a conversion is resumed with ``credential``
    (CredentialError when missing or wrong). Returns a dict for the CLI (``result`` = the
    :class:`InPlaceResult`). ``free_space(plain_volume)``: used space only; gives the ``skip``
    of :func:`start_conversion` for a fresh conversion (e.g.
    :func:`templatetool.pipeline.encrypt.sparse_skipper`: free in NTFS and unallocated).
    """
    from ..blockdev import View
    from ..disk import open_disk

    lock = _Lock(disk_path)
    try:
        dev = open_disk(disk_path, writable=True)
        try:
            off, size, index = _locate(dev, partition)
            view = View(dev, off, size, name=f"{disk_path} volume@{off}")
            st = probe(view)
            if st.state == "converting" or resume_only:
                if st.state == "converting" and not credential:
                    raise CredentialError(
                        "the volume is in the middle of an in-place conversion; a credential is needed to resume it",
                        view.name,
                        "give the recovery password file, startup key or password of the first run",
                    )
                r = resume_conversion(view, credential or {}, engine)
            else:
                if not protectors:
                    raise UsageError("at least one key protector is needed")
                skip = free_space(view) if free_space is not None else None  # read before any write
                r = start_conversion(
                    view,
                    protectors=protectors,
                    method=method,
                    description=description,
                    on_keys=on_keys,
                    engine=engine,
                    skip=skip,
                )
            dev.flush()
        finally:
            dev.close()
    finally:
        lock.close()
    return {"disk": str(disk_path), "partition": index, "volume_offset": off, "volume_size": size, "result": r}
