"""TCG PC Client event logs: parse (crypto-agile "Spec ID Event03" and legacy SHA-1 formats) and
replay them into the PCR values they imply, per bank.

Rules (TCG PC Client Platform Firmware Profile, section 10): PCR 0–16 and 23 start at zero,
17–22 at all-ones; every event extends ``PCR = H(PCR || digest)`` in each bank it carries a
digest for; EV_NO_ACTION events are not extended, but a "StartupLocality" EV_NO_ACTION sets
PCR 0's initial value to the locality in its last byte.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from construct import ConstructError

from ..errors import FormatError, NotFoundError, ResourceError
from . import structs as s
from .algs import ALG_NAMES, HASH_ALGS, NUM_PCRS, hash_bytes

#: Refuse absurd inputs early (real logs are tens of KiB to a few MiB).
MAX_LOG = 64 << 20
MAX_EVENT_DATA = 16 << 20


@dataclass(slots=True)
class Event:
    """One log entry."""

    index: int
    pcr: int
    type: int
    digests: dict[int, bytes]  # TPM_ALG_ID -> digest
    data: bytes
    offset: int

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "pcr": self.pcr,
            "type": f"0x{self.type:08x}",
            "digests": {ALG_NAMES.get(a, f"0x{a:04x}"): d.hex() for a, d in self.digests.items()},
            "data_size": len(self.data),
            "offset": self.offset,
        }


@dataclass
class EventLog:
    """A parsed log: its format, declared banks (alg -> digest size) and events."""

    format: str  # "crypto-agile" or "sha1"
    banks: dict[int, int]
    events: list[Event] = field(default_factory=list)


@dataclass
class Replay:
    """PCR values per bank name (all 24 PCRs) and which PCRs the log touched."""

    format: str
    values_by_bank: dict[str, dict[int, bytes]]
    measured: list[int]
    startup_locality: int
    event_count: int
    skipped_banks: list[str] = field(default_factory=list)

    def to_json(self, all_pcrs: bool = False) -> dict[str, object]:
        pcrs = range(NUM_PCRS) if all_pcrs else self.measured
        return {
            "format": self.format,
            "events": self.event_count,
            "startup_locality": self.startup_locality,
            "banks": {b: {str(i): v[i].hex() for i in pcrs} for b, v in self.values_by_bank.items()},
            "skipped_banks": self.skipped_banks,
        }


def _u32(buf: bytes, off: int, where: str) -> int:
    if off + 4 > len(buf):
        raise FormatError("event log truncated", where)
    return int.from_bytes(buf[off : off + 4], "little")


#: Per-event fixed headers, for the hot loop (a log may hold millions of events): ``struct``
#: mirrors of the construct declarations in structs.py (about 20x faster per event), checked
#: against them here so the two cannot drift apart.
_PCR_EVENT_HEAD = struct.Struct("<II20sI")  # TCG_PCR_EVENT up to the event size
_EVENT2_HEAD = struct.Struct("<III")  # TCG_PCR_EVENT2_HEAD
_DIGEST_ALG = struct.Struct("<H")  # TCG_DIGEST_ALG
assert _EVENT2_HEAD.size == s.TCG_PCR_EVENT2_HEAD.sizeof() and _DIGEST_ALG.size == s.TCG_DIGEST_ALG.sizeof()
assert s.TCG_PCR_EVENT.parse(_PCR_EVENT_HEAD.pack(1, 2, bytes(range(20)), 1) + b"x") == {
    "pcrIndex": 1,
    "eventType": 2,
    "digest": bytes(range(20)),
    "event": b"x",
}
_PAD_STEP = 1 << 16


def _trailing_run(data: bytes, byte: int) -> int:
    """Offset where the trailing run of ``byte`` starts (``len(data)`` if there is none); no big copies."""
    i = len(data)
    while i > 0:
        lo = max(0, i - _PAD_STEP)
        if data.count(byte, lo, i) == i - lo:
            i = lo
            continue
        return lo + len(data[lo:i].rstrip(bytes([byte])))
    return 0


def _padding_start(data: bytes) -> int:
    """Events end where the rest of the log is all zero or all 0xFF (pre-allocated log areas)."""
    return min(_trailing_run(data, 0), _trailing_run(data, 0xFF))


def _sha1_event(data: bytes, off: int, where: str) -> tuple[int, int, bytes, bytes]:
    """One TCG_PCR_EVENT at ``off``: (pcrIndex, eventType, digest, event); reads only that event."""
    if off + 32 > len(data):
        raise FormatError("event log truncated", f"{where}, offset {off}")
    pcr, typ, digest, n = _PCR_EVENT_HEAD.unpack_from(data, off)
    if n > MAX_EVENT_DATA or off + 32 + n > len(data):
        raise FormatError("event log truncated", f"{where}, offset {off}")
    return pcr, typ, digest, data[off + 32 : off + 32 + n]


def _open_log(data: bytes, where: str) -> tuple[EventLog, Iterator[Event]]:
    """Read the log header: an EventLog without events, and an iterator over all its events.

    Parsing walks explicit offsets: time is linear in the log size, and the iterator holds one
    event at a time."""
    if len(data) < 32:
        raise FormatError("too short for a TCG event log", where)
    try:
        pcr0, type0, _, event0 = _sha1_event(data, 0, where)
    except FormatError:
        raise FormatError("not a TCG event log (first event unreadable)", where) from None
    first_len = 32 + len(event0)
    end = _padding_start(data)
    if type0 == s.EV_NO_ACTION and event0.startswith(s.SPEC_ID_SIGNATURE):
        try:
            spec = s.TCG_EFI_SPEC_ID_EVENT.parse(event0)
        except ConstructError:
            raise FormatError("malformed Spec ID Event03 header", where) from None
        banks = {a.algorithmId: a.digestSize for a in spec.algorithms}
        if not banks or any(not 0 < size <= 64 for size in banks.values()):
            raise FormatError("Spec ID Event03 lists no or invalid digest sizes", where)
        head = Event(0, pcr0, type0, {}, event0, 0)
        return EventLog("crypto-agile", banks), _iter_agile(data, first_len, end, banks, head, where)
    if type0 == s.EV_NO_ACTION and event0.startswith(b"Spec ID Event"):
        raise FormatError("unsupported TCG log header (not Spec ID Event03)", where)
    return EventLog("sha1", {s.ALG_SHA1: 20}), _iter_sha1(data, end, where)


def _iter_sha1(data: bytes, end: int, where: str) -> Iterator[Event]:
    off = 0
    index = 0
    while off < end:
        pcr, typ, digest, event = _sha1_event(data, off, where)
        _check_pcr(pcr, where, off)
        yield Event(index, pcr, typ, {s.ALG_SHA1: digest}, event, off)
        index += 1
        off += 32 + len(event)


def parse_log(data: bytes, where: str = "event log") -> EventLog:
    """Parse a binary TCG event log (bounded, checked; FormatError on malformed input)."""
    log, events = _open_log(data, where)
    log.events.extend(events)
    return log


def _check_pcr(pcr: int, where: str, off: int) -> None:
    if pcr >= NUM_PCRS:
        raise FormatError(f"event for PCR {pcr} (> 23)", f"{where}, offset {off}")


def _iter_agile(data: bytes, off: int, end: int, banks: dict[int, int], first: Event, where: str) -> Iterator[Event]:
    yield first
    index = 1
    while off < end:
        start = off
        loc = f"{where}, offset {start}"
        if off + 12 > len(data):
            raise FormatError("event log truncated", loc)
        pcr, typ, count = _EVENT2_HEAD.unpack_from(data, off)
        off += 12
        _check_pcr(pcr, where, start)
        if count > len(banks):
            raise FormatError(f"event has {count} digests, the header declares {len(banks)} banks", loc)
        digests: dict[int, bytes] = {}
        for _ in range(count):
            if off + 2 > len(data):
                raise FormatError("event log truncated", loc)
            (alg,) = _DIGEST_ALG.unpack_from(data, off)
            off += 2
            size = banks.get(alg)
            if size is None:
                raise FormatError(f"digest algorithm 0x{alg:04x} not declared in the Spec ID header", loc)
            if off + size > len(data):
                raise FormatError("event log truncated", loc)
            digests[alg] = data[off : off + size]
            off += size
        n = _u32(data, off, loc)
        off += 4
        if n > MAX_EVENT_DATA or off + n > len(data):
            raise FormatError("event data runs past the end of the log", loc)
        yield Event(index, pcr, typ, digests, data[off : off + n], start)
        index += 1
        off += n


def initial_pcrs(size: int, locality: int = 0) -> dict[int, bytes]:
    """Reset values: PCR 0..16, 23 zeros (PCR 0's last byte = startup locality), 17..22 all-ones."""
    vals = {i: bytes(size) for i in range(NUM_PCRS)}
    for i in range(17, 23):
        vals[i] = b"\xff" * size
    vals[0] = bytes(size - 1) + bytes([locality])
    return vals


def _replay_pass(fmt: str, banks: dict[int, int], events: Iterable[Event], locality: int | None) -> tuple[Replay, bool]:
    """One streaming pass. ``locality`` None: take it from StartupLocality events as they come.
    Returns the replay and whether a StartupLocality event came after PCR 0 was extended (the
    caller then runs a second pass with the final locality fixed)."""
    fixed = locality is not None
    loc = locality or 0
    values: dict[str, dict[int, bytes]] = {}
    active: dict[int, dict[int, bytes]] = {}
    skipped: list[str] = []
    for alg, size in banks.items():
        name = ALG_NAMES.get(alg, f"0x{alg:04x}")
        if alg not in HASH_ALGS or HASH_ALGS[alg][1]().digest_size != size:
            skipped.append(name)
            continue
        active[alg] = values[name] = initial_pcrs(size, loc)
    measured: set[int] = set()
    pcr0_extended = rerun = False
    count = 0
    for ev in events:
        if ev.type == s.EV_NO_ACTION:
            if (
                ev.pcr == 0
                and ev.data.startswith(s.STARTUP_LOCALITY_SIGNATURE)
                and not (fmt == "crypto-agile" and ev.index == 0)
            ):
                try:
                    new = s.STARTUP_LOCALITY_EVENT.parse(ev.data).locality
                except ConstructError:
                    raise FormatError("malformed StartupLocality event", f"event {ev.index}") from None
                if not fixed and new != loc:
                    loc = new
                    if pcr0_extended:
                        rerun = True
                    else:
                        for alg, pcrs in active.items():
                            pcrs[0] = initial_pcrs(banks[alg], loc)[0]
            continue
        count += 1
        for alg, pcrs in active.items():
            d = ev.digests.get(alg)
            if d is None:
                continue
            pcrs[ev.pcr] = hash_bytes(alg, pcrs[ev.pcr], d)
            measured.add(ev.pcr)
            if ev.pcr == 0:
                pcr0_extended = True
    return Replay(fmt, values, sorted(measured), loc, count, skipped), rerun


def _replay(fmt: str, banks: dict[int, int], events: Callable[[], Iterable[Event]]) -> Replay:
    rep, rerun = _replay_pass(fmt, banks, events(), None)
    if rerun:
        rep, _ = _replay_pass(fmt, banks, events(), rep.startup_locality)
    return rep


def replay(log: EventLog) -> Replay:
    """Compute the PCR values the log implies, for every bank we can hash."""
    return _replay(log.format, log.banks, lambda: iter(log.events))


def read_log(path: str | os.PathLike[str]) -> bytes:
    """Read a log file (bounded)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_LOG:
            raise FormatError(f"event log too large ({size} bytes)", str(p))
        return p.read_bytes()
    except FileNotFoundError:
        raise NotFoundError("event log not found", str(p)) from None
    except IsADirectoryError:
        raise FormatError("event log path is a directory", str(p)) from None
    except OSError as e:
        raise ResourceError(f"cannot read event log: {e.strerror}", str(p)) from None


def replay_log(log: str | os.PathLike[str] | bytes) -> Replay:
    """Parse and replay a log given as bytes or a path."""
    if isinstance(log, (bytes, bytearray)):
        data, where = bytes(log), "event log"
    else:
        data, where = read_log(log), str(log)
    head, _ = _open_log(data, where)
    # streamed: the events are parsed again per pass instead of being held in memory
    return _replay(head.format, head.banks, lambda: _open_log(data, where)[1])


# --- writer (for tests and for producing reference logs) ----------------------------------------


def write_agile_log(
    events: list[tuple[int, int, dict[int, bytes], bytes]],
    banks: dict[int, int] | None = None,
    startup_locality: int | None = None,
) -> bytes:
    """Build a crypto-agile log: ``events`` = (pcr, type, {alg: digest}, data)."""
    banks = banks or {s.ALG_SHA1: 20, s.ALG_SHA256: 32}
    spec = s.TCG_EFI_SPEC_ID_EVENT.build(
        {
            "signature": s.SPEC_ID_SIGNATURE,
            "platformClass": 0,
            "specVersionMinor": 0,
            "specVersionMajor": 2,
            "specErrata": 2,
            "uintnSize": 2,
            "algorithms": [{"algorithmId": a, "digestSize": n} for a, n in banks.items()],
            "vendorInfo": b"",
        }
    )
    out = bytearray(
        s.TCG_PCR_EVENT.build({"pcrIndex": 0, "eventType": s.EV_NO_ACTION, "digest": bytes(20), "event": spec})
    )
    allev = list(events)
    if startup_locality is not None:
        allev.insert(
            0,
            (
                0,
                s.EV_NO_ACTION,
                {a: bytes(n) for a, n in banks.items()},
                s.STARTUP_LOCALITY_SIGNATURE + bytes([startup_locality]),
            ),
        )
    for pcr, typ, digests, data in allev:
        out += s.TCG_PCR_EVENT2_HEAD.build({"pcrIndex": pcr, "eventType": typ, "digestCount": len(digests)})
        for a, d in digests.items():
            out += s.TCG_DIGEST_ALG.build(a) + d
        out += s.TCG_EVENT_SIZE.build(len(data)) + data
    return bytes(out)


def write_sha1_log(events: list[tuple[int, int, bytes, bytes]]) -> bytes:
    """Build a legacy SHA-1 log: ``events`` = (pcr, type, sha1 digest, data)."""
    return b"".join(
        s.TCG_PCR_EVENT.build({"pcrIndex": p, "eventType": t, "digest": d, "event": data}) for p, t, d, data in events
    )


__all__ = ["parse_log", "read_log", "replay", "replay_log", "write_agile_log", "write_sha1_log"]
