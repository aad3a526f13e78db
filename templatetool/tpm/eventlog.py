"""TCG PC Client event logs: parse (crypto-agile "Spec ID Event03" and legacy SHA-1 formats) and
replay them into the PCR values they imply, per bank.

Rules (TCG PC Client Platform Firmware Profile, section 10): PCR 0–16 and 23 start at zero,
17–22 at all-ones; every event extends ``PCR = H(PCR || digest)`` in each bank it carries a
digest for; EV_NO_ACTION events are not extended, but a "StartupLocality" EV_NO_ACTION sets
PCR 0's initial value to the locality in its last byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from construct import ConstructError

from ..errors import FormatError, NotFoundError, ResourceError
from . import structs as s
from .algs import ALG_NAMES, HASH_ALGS, NUM_PCRS, hash_bytes

#: Refuse absurd inputs early (real logs are tens of KiB to a few MiB).
MAX_LOG = 64 << 20
MAX_EVENT_DATA = 16 << 20


@dataclass
class Event:
    """One log entry."""

    index: int
    pcr: int
    type: int
    digests: dict[int, bytes]  # TPM_ALG_ID -> digest
    data: bytes
    offset: int

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "pcr": self.pcr, "type": f"0x{self.type:08x}",
                "digests": {ALG_NAMES.get(a, f"0x{a:04x}"): d.hex() for a, d in self.digests.items()},
                "data_size": len(self.data), "offset": self.offset}


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
        return {"format": self.format, "events": self.event_count, "startup_locality": self.startup_locality,
                "banks": {b: {str(i): v[i].hex() for i in pcrs} for b, v in self.values_by_bank.items()},
                "skipped_banks": self.skipped_banks}


def _u32(buf: bytes, off: int, where: str) -> int:
    if off + 4 > len(buf):
        raise FormatError("event log truncated", where)
    return int.from_bytes(buf[off:off + 4], "little")


def parse_log(data: bytes, where: str = "event log") -> EventLog:
    """Parse a binary TCG event log (bounded, checked; FormatError on malformed input)."""
    if len(data) < 32:
        raise FormatError("too short for a TCG event log", where)
    try:
        first = s.TCG_PCR_EVENT.parse(data)
    except ConstructError:
        raise FormatError("not a TCG event log (first event unreadable)", where) from None
    first_len = 32 + len(first.event)
    if first.eventType == s.EV_NO_ACTION and first.event.startswith(s.SPEC_ID_SIGNATURE):
        try:
            spec = s.TCG_EFI_SPEC_ID_EVENT.parse(first.event)
        except ConstructError:
            raise FormatError("malformed Spec ID Event03 header", where) from None
        banks = {a.algorithmId: a.digestSize for a in spec.algorithms}
        if not banks or any(not 0 < size <= 64 for size in banks.values()):
            raise FormatError("Spec ID Event03 lists no or invalid digest sizes", where)
        log = EventLog("crypto-agile", banks)
        log.events.append(Event(0, first.pcrIndex, first.eventType, {}, bytes(first.event), 0))
        _parse_agile(data, first_len, log, where)
        return log
    if first.eventType == s.EV_NO_ACTION and first.event.startswith(b"Spec ID Event"):
        raise FormatError("unsupported TCG log header (not Spec ID Event03)", where)
    log = EventLog("sha1", {s.ALG_SHA1: 20})
    off = 0
    while off < len(data):
        if _padding(data, off):
            break
        try:
            ev = s.TCG_PCR_EVENT.parse(data[off:])
        except ConstructError:
            raise FormatError("event log truncated", f"{where}, offset {off}") from None
        _check_pcr(ev.pcrIndex, where, off)
        log.events.append(Event(len(log.events), ev.pcrIndex, ev.eventType, {s.ALG_SHA1: bytes(ev.digest)},
                                bytes(ev.event), off))
        off += 32 + len(ev.event)
    return log


def _padding(data: bytes, off: int) -> bool:
    rest = data[off:]
    return rest.count(0) == len(rest) or rest.count(0xFF) == len(rest)


def _check_pcr(pcr: int, where: str, off: int) -> None:
    if pcr >= NUM_PCRS:
        raise FormatError(f"event for PCR {pcr} (> 23)", f"{where}, offset {off}")


def _parse_agile(data: bytes, off: int, log: EventLog, where: str) -> None:
    while off < len(data):
        if _padding(data, off):
            return
        start = off
        loc = f"{where}, offset {start}"
        if off + 12 > len(data):
            raise FormatError("event log truncated", loc)
        head = s.TCG_PCR_EVENT2_HEAD.parse(data[off:off + 12])
        off += 12
        _check_pcr(head.pcrIndex, where, start)
        if head.digestCount > len(log.banks):
            raise FormatError(f"event has {head.digestCount} digests, the header declares {len(log.banks)} banks", loc)
        digests: dict[int, bytes] = {}
        for _ in range(head.digestCount):
            if off + 2 > len(data):
                raise FormatError("event log truncated", loc)
            alg = s.TCG_DIGEST_ALG.parse(data[off:off + 2])
            off += 2
            size = log.banks.get(alg)
            if size is None:
                raise FormatError(f"digest algorithm 0x{alg:04x} not declared in the Spec ID header", loc)
            if off + size > len(data):
                raise FormatError("event log truncated", loc)
            digests[alg] = data[off:off + size]
            off += size
        n = _u32(data, off, loc)
        off += 4
        if n > MAX_EVENT_DATA or off + n > len(data):
            raise FormatError("event data runs past the end of the log", loc)
        log.events.append(Event(len(log.events), head.pcrIndex, head.eventType, digests, data[off:off + n], start))
        off += n


def initial_pcrs(size: int, locality: int = 0) -> dict[int, bytes]:
    """Reset values: PCR 0..16, 23 zeros (PCR 0's last byte = startup locality), 17..22 all-ones."""
    vals = {i: bytes(size) for i in range(NUM_PCRS)}
    for i in range(17, 23):
        vals[i] = b"\xff" * size
    vals[0] = bytes(size - 1) + bytes([locality])
    return vals


def replay(log: EventLog) -> Replay:
    """Compute the PCR values the log implies, for every bank we can hash."""
    locality = 0
    for ev in log.events[1 if log.format == "crypto-agile" else 0:]:
        if ev.type == s.EV_NO_ACTION and ev.pcr == 0 and ev.data.startswith(s.STARTUP_LOCALITY_SIGNATURE):
            try:
                locality = s.STARTUP_LOCALITY_EVENT.parse(ev.data).locality
            except ConstructError:
                raise FormatError("malformed StartupLocality event", f"event {ev.index}") from None
    values: dict[str, dict[int, bytes]] = {}
    skipped: list[str] = []
    measured: set[int] = set()
    for alg, size in log.banks.items():
        name = ALG_NAMES.get(alg, f"0x{alg:04x}")
        if alg not in HASH_ALGS or HASH_ALGS[alg][1]().digest_size != size:
            skipped.append(name)
            continue
        pcrs = initial_pcrs(size, locality)
        for ev in log.events:
            if ev.type == s.EV_NO_ACTION or alg not in ev.digests:
                continue
            pcrs[ev.pcr] = hash_bytes(alg, pcrs[ev.pcr], ev.digests[alg])
            measured.add(ev.pcr)
        values[name] = pcrs
    return Replay(log.format, values, sorted(measured), locality,
                  sum(1 for e in log.events if e.type != s.EV_NO_ACTION), skipped)


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
        return replay(parse_log(bytes(log)))
    return replay(parse_log(read_log(log), str(log)))


# --- writer (for tests and for producing reference logs) ----------------------------------------

def write_agile_log(events: list[tuple[int, int, dict[int, bytes], bytes]], banks: dict[int, int] | None = None,
                    startup_locality: int | None = None) -> bytes:
    """Build a crypto-agile log: ``events`` = (pcr, type, {alg: digest}, data)."""
    banks = banks or {s.ALG_SHA1: 20, s.ALG_SHA256: 32}
    spec = s.TCG_EFI_SPEC_ID_EVENT.build({
        "signature": s.SPEC_ID_SIGNATURE, "platformClass": 0, "specVersionMinor": 0, "specVersionMajor": 2,
        "specErrata": 2, "uintnSize": 2,
        "algorithms": [{"algorithmId": a, "digestSize": n} for a, n in banks.items()], "vendorInfo": b""})
    out = bytearray(s.TCG_PCR_EVENT.build({"pcrIndex": 0, "eventType": s.EV_NO_ACTION, "digest": bytes(20),
                                           "event": spec}))
    allev = list(events)
    if startup_locality is not None:
        allev.insert(0, (0, s.EV_NO_ACTION, {a: bytes(n) for a, n in banks.items()},
                         s.STARTUP_LOCALITY_SIGNATURE + bytes([startup_locality])))
    for pcr, typ, digests, data in allev:
        out += s.TCG_PCR_EVENT2_HEAD.build({"pcrIndex": pcr, "eventType": typ, "digestCount": len(digests)})
        for a, d in digests.items():
            out += s.TCG_DIGEST_ALG.build(a) + d
        out += s.TCG_EVENT_SIZE.build(len(data)) + data
    return bytes(out)


def write_sha1_log(events: list[tuple[int, int, bytes, bytes]]) -> bytes:
    """Build a legacy SHA-1 log: ``events`` = (pcr, type, sha1 digest, data)."""
    return b"".join(s.TCG_PCR_EVENT.build({"pcrIndex": p, "eventType": t, "digest": d, "event": data})
                    for p, t, d, data in events)
