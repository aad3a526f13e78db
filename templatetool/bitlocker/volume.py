"""BitLocker volumes: open, inspect, unlock (decrypted streaming view) and encrypt.

The decrypted view presents the volume the way libbde, dislocker and dissect.fve do: logical
sectors 0..N-1 come from the relocated (encrypted) copy at the VHO offset, the three 64 KiB
metadata regions and the VHO region read as zeros, bytes at or beyond the encrypted size are
returned raw, and everything else is decrypted in place with its own physical sector number.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..blockdev import CHUNK, BlockDevice
from ..errors import (
    CredentialError,
    FormatError,
    IntegrityError,
    TemplateToolError,
    UsageError,
)
from ..parallel import Engine, Job, PassTaps, SkipFn, SpanFn, chunk_items, default_engine
from ..progress import progress
from . import keys as K
from . import structs as S
from .cipher import SectorCipher, make_cipher
from .metadata import (
    Entry,
    Metadata,
    build_boot_sector,
    build_metadata_block,
    finish_metadata_block,
    make_entry,
    parse_boot_sector,
    parse_metadata_block,
    unicode_entry,
    unicode_text,
    volume_layout,
)

#: Method names accepted by :func:`encrypt_volume`.
METHODS_BY_NAME = {v: k for k, v in S.METHOD_NAMES.items()}


def is_bitlocker(dev: BlockDevice) -> bool:
    """True when the device starts with a BitLocker (Windows 7+) volume header (``-FVE-FS-`` or
    the To Go layout)."""
    if dev.size < 512:
        return False
    return volume_layout(dev.read(0, 512)) is not None


@dataclass
class FveRegions:
    """Where BitLocker's own data goes inside the volume (byte offsets from the volume start).

    ``metadata_offsets``: the three 64 KiB metadata regions; ``vho_offset``/``vho_size``: the
    region holding the encrypted copy of the first sectors (8 KiB: 16 x 512 or 2 x 4096).
    """

    metadata_offsets: tuple[int, int, int]
    vho_offset: int
    vho_size: int = S.VHO_REGION_SIZE

    def spans(self) -> list[tuple[int, int]]:
        """(offset, length) of the four reserved regions."""
        return [(o, S.METADATA_REGION_SIZE) for o in self.metadata_offsets] + [(self.vho_offset, self.vho_size)]


@dataclass
class ProtectorInfo:
    """A key protector as listed by :meth:`FveVolume.info`."""

    type: str
    protection: int
    guid: str
    created: str | None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "protection": f"{self.protection:#06x}", "guid": self.guid, "created": self.created}


class FveVolume:
    """A BitLocker volume: parsed header and metadata copies; :meth:`unlock` gives the plaintext."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.name = dev.name
        if dev.size < 512:
            raise FormatError("volume too small to be BitLocker", dev.name)
        self.boot = parse_boot_sector(dev.read(0, 512), dev.size, f"{dev.name}: FVE volume header")
        self.sector_size = self.boot.sector_size
        #: ``standard`` (``-FVE-FS-`` header) or ``to-go`` (removable-media header)
        self.layout = self.boot.layout
        self.copies: list[dict[str, Any]] = []
        self.meta: Metadata | None = None
        #: every copy whose CRC and structure are good, in order (the validation MAC is checked at unlock)
        self.valid_metas: list[Metadata] = []
        first_error: TemplateToolError | None = None
        for i, off in enumerate(self.boot.metadata_offsets):
            n = min(S.METADATA_REGION_SIZE, dev.size - off)
            try:
                m = parse_metadata_block(dev.read(off, n), off, dev.size, i + 1)
                if m.metadata_offsets != self.boot.metadata_offsets:
                    raise FormatError(
                        "metadata offsets in the block differ from the volume header",
                        f"FVE metadata copy {i + 1} at {off:#x}",
                    )
                self.copies.append({"copy": i + 1, "offset": off, "valid": True, "error": None})
                self.valid_metas.append(m)
                if self.meta is None:
                    self.meta = m
            except TemplateToolError as e:
                self.copies.append({"copy": i + 1, "offset": off, "valid": False, "error": str(e)})
                if first_error is None:
                    first_error = e
        if self.meta is None:
            assert first_error is not None
            raise type(first_error)(
                f"no valid FVE metadata copy (first: {first_error.what})",
                f"{dev.name}: {first_error.where}",
                "the volume metadata is corrupt",
            )
        m = self.meta
        self.method = m.method
        self.vho_size = m.vho_size or m.virtualized_sectors * self.sector_size
        if self.vho_size % self.sector_size or self.vho_size // self.sector_size != m.virtualized_sectors:
            raise FormatError(
                f"relocated header size {self.vho_size:#x} does not match "
                f"{m.virtualized_sectors} sectors of {self.sector_size}",
                dev.name,
            )

    # ---- description ---------------------------------------------------------------------
    @property
    def metadata(self) -> Metadata:
        assert self.meta is not None
        return self.meta

    def protectors(self) -> list[ProtectorInfo]:
        out = []
        for e in self.metadata.entries_of(S.ROLE_VMK, S.VT_VMK):
            p = S.VmkPayload.parse(e.payload)
            out.append(
                ProtectorInfo(
                    S.PROTECTION_NAMES.get(p.protection, f"unknown-{p.protection:#06x}"),
                    p.protection,
                    str(uuid.UUID(bytes_le=p.guid)),
                    K.filetime_to_iso(p.modified),
                )
            )
        return out

    def description(self) -> str | None:
        d = self.metadata.entries_of(S.ROLE_DESCRIPTION, S.VT_UNICODE)
        return unicode_text(d[0]) if d else None

    def regions(self) -> FveRegions:
        m = self.metadata
        return FveRegions(m.metadata_offsets, m.vho_offset, self.vho_size)

    def info(self) -> dict[str, Any]:
        """Method, sector size, GUID, sizes, state, protectors and metadata copies."""
        m = self.metadata
        return {
            "layout": self.layout,
            "method": S.METHOD_NAMES.get(m.method, "unknown"),
            "method_code": f"{m.method:#06x}",
            "sector_size": self.sector_size,
            "volume_guid": str(m.volume_guid),
            "volume_size": self.dev.size,
            "encrypted_size": m.encrypted_size,
            "state": S.STATE_NAMES.get(m.current_state, str(m.current_state)),
            "created": K.filetime_to_iso(m.created),
            "description": self.description(),
            "protectors": [p.to_json() for p in self.protectors()],
            "copies": [
                {"copy": c["copy"], "offset": c["offset"], "valid": c["valid"], "error": c["error"]}
                for c in self.copies
            ],
            "relocated_header": {"offset": m.vho_offset, "size": self.vho_size, "sectors": m.virtualized_sectors},
        }

    # ---- unlock -----------------------------------------------------------------------------
    def _vmks(self, protection: int) -> list[tuple[Entry, Any]]:
        out = []
        for e in self.metadata.entries_of(S.ROLE_VMK, S.VT_VMK):
            p = S.VmkPayload.parse(e.payload)
            if p.protection == protection:
                out.append((e, p))
        return out

    def tpm_blobs(self) -> list[bytes]:
        """The sealed payloads (TPM_ENCODED after its u32 PCR bitmap) of the TPM protectors."""
        out = []
        for e, _p in self._vmks(S.PROT_TPM):
            t = e.child(S.VT_TPM_ENCODED)
            if t is not None and len(t.payload) > 4:
                out.append(bytes(t.payload[4:]))
        return out

    def _open_vmk(self, e: Entry, key: bytes) -> bytes:
        ccm = e.child(S.VT_AES_CCM)
        if ccm is None:
            raise FormatError("key protector has no encrypted VMK", e.where)
        plain = K.ccm_unwrap(key, ccm.payload, e.where)
        _, vmk = K.parse_key_entry(plain, e.where + " (decrypted VMK)", expect_len=32)
        return vmk

    def _stretched(self, protection: int, initial: bytes, what: str) -> bytes:
        cands = self._vmks(protection)
        if not cands:
            raise CredentialError(f"the volume has no {what} protector", self.name)
        for e, _ in cands:
            sk = e.child(S.VT_STRETCH_KEY)
            if sk is None:
                continue
            salt = S.StretchKeyPayload.parse(sk.payload).salt
            try:
                return self._open_vmk(e, K.stretch_key(initial, salt))
            except CredentialError:
                continue
        raise CredentialError(f"the {what} does not unlock this volume", self.name, "check the credential")

    def recover_vmk(
        self,
        recovery_password: str | None = None,
        password: str | None = None,
        bek: bytes | None = None,
        vmk: bytes | None = None,
        clear: bool = False,
    ) -> bytes:
        """Return the 32-byte VMK from exactly one credential (CredentialError when wrong)."""
        given = [x is not None for x in (recovery_password, password, bek, vmk)] + [bool(clear)]
        if sum(given) != 1:
            raise UsageError("give exactly one credential (recovery password, password, startup key, VMK or clear key)")
        if vmk is not None:
            if len(vmk) != 32:
                raise CredentialError("a VMK has 32 bytes")
            return vmk
        if recovery_password is not None:
            key16 = K.parse_recovery_password(recovery_password)
            return self._stretched(S.PROT_RECOVERY_PASSWORD, K.recovery_initial_hash(key16), "recovery password")
        if password is not None:
            return self._stretched(S.PROT_PASSWORD, K.password_initial_hash(password), "password")
        if bek is not None:
            sk = K.parse_bek(bek)
            cands = self._vmks(S.PROT_STARTUP_KEY)
            if not cands:
                raise CredentialError("the volume has no startup-key protector", self.name)
            cands.sort(key=lambda ep: uuid.UUID(bytes_le=ep[1].guid) != sk.guid)
            for e, _ in cands:
                try:
                    return self._open_vmk(e, sk.key)
                except CredentialError:
                    continue
            raise CredentialError(
                f"the startup key {{{sk.guid}}} does not unlock this volume",
                self.name,
                "use the .BEK file made for this volume",
            )
        cands = self._vmks(S.PROT_CLEAR_KEY)
        if not cands:
            raise CredentialError("the volume has no clear key (protection is not suspended)", self.name)
        for e, _ in cands:
            k = e.child(S.VT_KEY)
            if k is None:
                continue
            try:
                return self._open_vmk(e, S.KeyPayload.parse(k.payload).key)
            except CredentialError:
                continue
        raise CredentialError("the clear key does not unlock this volume", self.name)

    def fvek(self, vmk: bytes) -> bytes:
        """Decrypt the FVEK with the VMK and check the validation entry (as dissect.fve does).

        A copy whose FVEK or validation entry does not verify (the CRC does not cover the
        validation entry) is skipped for the next valid copy, as dislocker does; the copy that
        verifies becomes the one in use.
        """
        first: IntegrityError | None = None
        for m in self.valid_metas or [self.metadata]:
            try:
                key = self._fvek_from(m, vmk)
            except IntegrityError as e:
                first = first or e
                continue
            self.meta = m
            return key
        assert first is not None
        raise first

    def _fvek_from(self, m: Metadata, vmk: bytes) -> bytes:
        e = m.entries_of(S.ROLE_FVEK, S.VT_AES_CCM)[0]
        try:
            plain = K.ccm_unwrap(vmk, e.payload, e.where + " (FVEK)")
        except CredentialError:
            raise IntegrityError(
                "the FVEK entry does not verify under the VMK",
                f"{self.name}: {e.where}",
                "the metadata was altered or the VMK is wrong",
            ) from None
        _, fvek = K.parse_key_entry(plain, e.where + " (decrypted FVEK)", expect_len=S.FVEK_LENGTH[m.method])
        if m.validation_ccm is not None:
            where = f"{self.name}: FVE metadata validation at {m.offset:#x}"
            try:
                vplain = K.ccm_unwrap(vmk, m.validation_ccm, where)
            except CredentialError:
                raise IntegrityError(
                    "metadata validation entry does not verify under the VMK", where, "the metadata was altered"
                ) from None
            _, digest = K.parse_key_entry(vplain, where, expect_len=32)
            if digest != m.sha256():
                raise IntegrityError(
                    "metadata SHA-256 does not match its validation entry", where, "the metadata was altered"
                )
        return fvek

    def unlock(
        self,
        recovery_password: str | None = None,
        password: str | None = None,
        bek: bytes | None = None,
        vmk: bytes | None = None,
        clear: bool = False,
    ) -> DecryptedVolume:
        """Unlock with one credential; return the read-only decrypted view."""
        key = self.recover_vmk(recovery_password, password, bek, vmk, clear)
        try:
            fvek = self.fvek(key)
        except IntegrityError:
            if vmk is not None:
                raise CredentialError("the given VMK does not unlock this volume", self.name) from None
            raise
        return DecryptedVolume(self, make_cipher(self.method, fvek, self.sector_size))


def open_fve(dev: BlockDevice) -> FveVolume:
    """Parse a BitLocker volume's header and metadata copies (first valid copy is used)."""
    return FveVolume(dev)


class DecryptedVolume(BlockDevice):
    """Read-only plaintext view of an unlocked BitLocker volume."""

    writable = False

    def __init__(self, fve: FveVolume, cipher: SectorCipher) -> None:
        self.fve = fve
        self.base = fve.dev
        self.cipher = cipher
        self.size = fve.dev.size
        self.sector_size = fve.sector_size
        self.name = f"{fve.dev.name} (decrypted)"
        m = fve.metadata
        self.encrypted_size = m.encrypted_size
        self.vho_offset = m.vho_offset
        self.header_len = fve.vho_size
        self._zero = [(o, S.METADATA_REGION_SIZE) for o in m.metadata_offsets] + [(m.vho_offset, fve.vho_size)]

    def _phys(self, a: int, b: int) -> bytes:
        """Decrypt physical sectors [a, b) (a, b sector-aligned; b may exceed the device)."""
        end = min(b, self.base.size)
        raw = self.base.read(a, end - a) if end > a else b""
        if len(raw) < b - a:
            raw += bytes(b - a - len(raw))
        enc_end = min(b, self.encrypted_size)
        if enc_end <= a:
            return raw
        k = (enc_end - a) // self.sector_size * self.sector_size
        if k == len(raw):
            return self.cipher.decrypt(raw, a // self.sector_size)
        return self.cipher.decrypt(memoryview(raw)[:k], a // self.sector_size) + raw[k:]

    def _chunk(self, a: int, b: int) -> bytes:
        """Logical sectors [a, b) of the plaintext view."""
        data = self._phys(a, b)
        buf: bytearray | None = None
        for zo, zl in self._zero:
            lo, hi = max(a, zo), min(b, zo + zl)
            if lo < hi:
                buf = buf if buf is not None else bytearray(data)
                buf[lo - a : hi - a] = bytes(hi - lo)
        if a < self.header_len:
            hi = min(b, self.header_len)
            buf = buf if buf is not None else bytearray(data)
            buf[0 : hi - a] = self._phys(self.vho_offset + a, self.vho_offset + hi)
        return data if buf is None else bytes(buf)

    def read_chunk_into(self, offset: int, length: int, out: memoryview) -> None:
        """Plaintext of ``[offset, offset+length)`` into ``out`` (which needs 16 bytes of room
        after ``length``). Sector-aligned spans inside the encrypted area that miss BitLocker's
        own structures are read and decrypted in place (no allocation); others use :meth:`read`."""
        ss = self.sector_size
        end = offset + length
        plain_span = (
            offset % ss == 0
            and length % ss == 0
            and offset >= self.header_len
            and end <= self.encrypted_size
            and end <= self.base.size
            and not any(zo < end and offset < zo + zl for zo, zl in self._zero)
        )
        if not plain_span or len(out) < length + 16:
            out[:length] = self.read(offset, length)
            return
        self._check_range(offset, length)
        buf = out[:length]
        self.base.read_into(offset, buf)
        self.cipher.decrypt_into(buf, offset // ss, out)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        ss = self.sector_size
        pos, end = offset, offset + length
        parts = []
        while pos < end:
            a = pos // ss * ss
            b = min(-(-end // ss) * ss, a + CHUNK)
            data = self._chunk(a, b)
            lo, hi = pos - a, min(end, b) - a
            parts.append(data if (lo == 0 and hi == len(data)) else data[lo:hi])
            pos = a + hi
        return parts[0] if len(parts) == 1 else b"".join(parts)


# ==== encryption ===============================================================================


class ProtectorKind(StrEnum):
    """The key protectors :func:`encrypt_volume` can write (values: library spelling; CLI
    spelling with hyphens: :attr:`public`)."""

    RECOVERY_PASSWORD = "recovery_password"
    PASSWORD = "password"
    STARTUP_KEY = "startup_key"
    CLEAR = "clear"
    TPM = "tpm"

    @classmethod
    def parse(cls, value: ProtectorKind | str) -> ProtectorKind:
        """``recovery-password`` or ``recovery_password`` (or a member) to the member."""
        if isinstance(value, ProtectorKind):
            return value
        try:
            return cls(value.replace("-", "_"))
        except ValueError:
            raise UsageError(
                f"unknown protector kind {value!r}", hint="one of " + ", ".join(k.public for k in cls)
            ) from None

    @classmethod
    def of_protection(cls, protection: int) -> ProtectorKind | None:
        """The kind writing VMK protection type ``protection`` (None: one we do not write)."""
        return _KIND_OF_PROTECTION.get(protection)

    @property
    def public(self) -> str:
        """The spelling in JSON output and on the command line (``recovery-password``)."""
        return self.value.replace("_", "-")

    @property
    def protection(self) -> S.Protection:
        """The VMK protection type this kind writes."""
        return _PROTECTION_OF_KIND[self]


_PROTECTION_OF_KIND = {
    ProtectorKind.RECOVERY_PASSWORD: S.Protection.RECOVERY_PASSWORD,
    ProtectorKind.PASSWORD: S.Protection.PASSWORD,
    ProtectorKind.STARTUP_KEY: S.Protection.STARTUP_KEY,
    ProtectorKind.CLEAR: S.Protection.CLEAR_KEY,
    ProtectorKind.TPM: S.Protection.TPM,
}
_KIND_OF_PROTECTION: dict[int, ProtectorKind] = {v: k for k, v in _PROTECTION_OF_KIND.items()}

#: ``seal(vmk_key_entry) -> (tpm_blob, pcr_bitmap)`` of a TPM protector.
SealFn = Callable[[bytes], tuple[bytes, int]]


@dataclass
class _Stretch:
    """A started key stretch: the salt, the job computing the stretched key and, for a recovery
    password, its 16-byte key."""

    salt: bytes
    job: Job
    key16: bytes | None = None


@dataclass(init=False)
class ProtectorSpec:
    """A key protector to add when encrypting.

    kinds (:class:`ProtectorKind`, or its name with ``_`` or ``-``): ``recovery_password``
    (``value`` optional: generated), ``password`` (``value``), ``startup_key`` (a 32-byte
    external key is generated; the result carries the .BEK bytes), ``clear`` (suspended
    protection, anyone can read) and ``tpm`` (``seal(vmk_key_entry) -> (tpm_blob, pcr_bitmap)``
    gets the 44-byte KEY entry holding the VMK).
    """

    kind: ProtectorKind
    value: str | None = None
    seal: SealFn | None = None
    _pre: _Stretch | None = field(default=None, repr=False, compare=False)

    def __init__(self, kind: ProtectorKind | str, value: str | None = None, seal: SealFn | None = None) -> None:
        self.kind = ProtectorKind.parse(kind)
        self.value = value
        self.seal = seal
        self._pre = None

    def __repr__(self) -> str:
        return f"ProtectorSpec(kind={self.kind.value!r})"

    def _stretches(self) -> bool:
        return self.kind is ProtectorKind.RECOVERY_PASSWORD or (
            self.kind is ProtectorKind.PASSWORD and bool(self.value)
        )

    def prepare(self, engine: Engine | None = None) -> ProtectorSpec:
        """Start this protector's key stretch now, on ``engine`` (a forked child: recovery
        password and password protectors; a no-op for the others), so that it overlaps whatever
        the caller does before encrypting. Call :meth:`discard` if the spec ends up unused."""
        if self._pre is None and self._stretches():
            self._pre = self._start_stretch(engine or default_engine(), True)
        return self

    def _start_stretch(self, engine: Engine, defer: bool) -> _Stretch:
        """Salt and submit the stretch (on ``engine`` when ``defer``, else computed now)."""
        salt = K.random_key(16)
        key16: bytes | None = None
        if self.kind is ProtectorKind.RECOVERY_PASSWORD:
            key16 = K.parse_recovery_password(self.value or K.generate_recovery_password())
            initial = K.recovery_initial_hash(key16)
        else:
            initial = K.password_initial_hash(self.value or "")

        def run() -> bytes:
            return K.stretch_key(initial, salt)

        return _Stretch(salt, engine.spawn(run, 32) if defer else Job.done(run()), key16)

    def discard(self) -> None:
        """Stop a stretch started by :meth:`prepare` whose result was not used."""
        if self._pre is not None:
            self._pre.job.close()
            self._pre = None


@dataclass
class ProtectorResult:
    """One protector written: its kind, GUID and the secrets the caller must deliver."""

    #: the kind (a protector read back from metadata that we do not write: its protection name)
    kind: ProtectorKind | str
    guid: str
    protection: int
    recovery_password: str | None = field(default=None, repr=False)
    bek: bytes | None = field(default=None, repr=False)

    @property
    def bek_filename(self) -> str | None:
        return f"{self.guid.upper()}.BEK" if self.bek is not None else None

    def to_json(self) -> dict[str, Any]:
        """Public description (never the secrets)."""
        kind = self.kind.public if isinstance(self.kind, ProtectorKind) else self.kind
        return {"type": kind, "guid": self.guid, "protection": f"{self.protection:#06x}"}


@dataclass
class EncryptResult:
    """What :func:`encrypt_volume` wrote (the FVEK and VMK are never returned)."""

    volume_guid: str
    method: str
    sector_size: int
    volume_size: int
    regions: FveRegions
    protectors: list[ProtectorResult]

    @property
    def recovery_password(self) -> str | None:
        return next((p.recovery_password for p in self.protectors if p.recovery_password), None)

    @property
    def bek(self) -> bytes | None:
        return next((p.bek for p in self.protectors if p.bek is not None), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "volume_guid": self.volume_guid,
            "method": self.method,
            "sector_size": self.sector_size,
            "volume_size": self.volume_size,
            "regions": {
                "metadata_offsets": list(self.regions.metadata_offsets),
                "vho_offset": self.regions.vho_offset,
                "vho_size": self.regions.vho_size,
            },
            "protectors": [p.to_json() for p in self.protectors],
        }


def _method_code(method: str | int) -> int:
    code = method if isinstance(method, int) else METHODS_BY_NAME.get(method.lower(), -1)
    if code not in S.METHOD_NAMES:
        raise UsageError(f"unknown encryption method {method!r}", hint="use xts-aes-128 or xts-aes-256")
    return code


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def check_regions(regions: FveRegions, volume_size: int, sector_size: int) -> None:
    """Validate placement: aligned, inside the volume, disjoint, clear of the first sectors."""
    spans = regions.spans()
    head = (0, regions.vho_size)
    for i, (o, n) in enumerate(spans):
        label = f"metadata region {i + 1}" if i < 3 else "relocated header region"
        if o % sector_size or n % sector_size or n <= 0:
            raise UsageError(f"{label} at {o:#x} (+{n:#x}) is not aligned to {sector_size}-byte sectors")
        if o + n > volume_size:
            raise UsageError(f"{label} at {o:#x} (+{n:#x}) lies outside the volume of {volume_size} bytes")
        if _overlaps((o, n), head):
            raise UsageError(f"{label} at {o:#x} overlaps the first sectors of the volume")
        for j in range(i):
            if _overlaps((o, n), spans[j]):
                raise UsageError(f"{label} at {o:#x} overlaps another BitLocker region")


def _vmk_entry(guid: uuid.UUID, ft: int, protection: int, nested: list[Entry]) -> Entry:
    fixed = S.build(
        S.VmkPayload, {"guid": guid.bytes_le, "modified": ft, "unknown": 0, "protection": protection, "nested": b""}
    )
    return make_entry(S.ROLE_VMK, S.VT_VMK, fixed, nested)


def _ccm_entry(key: bytes, plain: bytes, ns: K.NonceSource, role: int = S.ROLE_PROPERTY) -> Entry:
    t, c = ns.next()
    return Entry(role, S.VT_AES_CCM, K.ccm_wrap(key, plain, t, c))


def _stretch_entry(key_type: S.KeyType, salt: bytes, nested: list[Entry] | None = None) -> Entry:
    fixed = S.build(S.StretchKeyPayload, {"key_type": key_type, "flags": 0, "salt": salt, "nested": b""})
    return make_entry(S.ROLE_PROPERTY, S.VT_STRETCH_KEY, fixed, nested)


@dataclass
class _Protector:
    """One protector decided by :func:`plan_encryption`: its spec, GUID and started stretch."""

    spec: ProtectorSpec
    guid: uuid.UUID
    stretch: _Stretch | None


@dataclass
class _Keys:
    """What every protector builder needs: the VMK, the nonce source and the creation time."""

    vmk: bytes
    ns: K.NonceSource
    ft: int

    def vmk_under(self, key: bytes) -> Entry:
        """The VMK wrapped (AES-CCM) under ``key``."""
        return _ccm_entry(key, K.key_entry(S.KEYTYPE_VMK, self.vmk), self.ns)


_Built = tuple[list[Entry], ProtectorResult]


def _build_recovery_password(p: _Protector, k: _Keys) -> _Built:
    assert p.stretch is not None and p.stretch.key16 is not None
    key16 = p.stretch.key16
    skey = p.stretch.job.result()
    copy = _ccm_entry(k.vmk, K.key_entry(S.KEYTYPE_RECOVERY_STRETCH, key16), k.ns, S.ROLE_RECOVERY_KEY_COPY)
    stretch = _stretch_entry(S.KeyType.RECOVERY_STRETCH, p.stretch.salt, [copy])
    nested = [unicode_entry("DiskPassword"), stretch, k.vmk_under(skey)]
    return nested, ProtectorResult(
        p.spec.kind, str(p.guid), S.PROT_RECOVERY_PASSWORD, recovery_password=K.format_recovery_key(key16)
    )


def _build_password(p: _Protector, k: _Keys) -> _Built:
    assert p.stretch is not None
    skey = p.stretch.job.result()
    nested = [_stretch_entry(S.KeyType.PASSWORD_STRETCH, p.stretch.salt), k.vmk_under(skey)]
    return nested, ProtectorResult(p.spec.kind, str(p.guid), S.PROT_PASSWORD)


def _build_startup_key(p: _Protector, k: _Keys) -> _Built:
    ext = K.random_key(32)
    fixed = S.build(S.UseKeyPayload, {"key_type": S.KeyType.EXTERNAL, "flags": 0, "nested": b""})
    use = make_entry(
        S.ROLE_PROPERTY, S.VT_USE_KEY, fixed, [_ccm_entry(k.vmk, K.key_entry(S.KEYTYPE_EXTERNAL, ext), k.ns)]
    )
    nested = [unicode_entry("ExternalKey"), use, k.vmk_under(ext)]
    return nested, ProtectorResult(p.spec.kind, str(p.guid), S.PROT_STARTUP_KEY, bek=K.build_bek(p.guid, ext, k.ft))


def _build_clear(p: _Protector, k: _Keys) -> _Built:
    ck = K.random_key(32)
    keyent = Entry(
        S.ROLE_PROPERTY, S.VT_KEY, S.build(S.KeyPayload, {"key_type": S.KeyType.CLEAR, "flags": 0, "key": ck})
    )
    return [keyent, k.vmk_under(ck)], ProtectorResult(p.spec.kind, str(p.guid), S.PROT_CLEAR_KEY)


def _build_tpm(p: _Protector, k: _Keys) -> _Built:
    assert p.spec.seal is not None
    blob, pcrs = p.spec.seal(K.key_entry(S.KEYTYPE_VMK, k.vmk))
    payload = S.build(S.TpmEncodedPayload, {"pcr_bitmap": pcrs & 0xFFFFFFFF, "blob": bytes(blob)})
    return [Entry(S.ROLE_PROPERTY, S.VT_TPM_ENCODED, payload)], ProtectorResult(p.spec.kind, str(p.guid), S.PROT_TPM)


#: One builder per protector kind: the VMK entry's nested entries and the result to report.
_BUILDERS: dict[ProtectorKind, Callable[[_Protector, _Keys], _Built]] = {
    ProtectorKind.RECOVERY_PASSWORD: _build_recovery_password,
    ProtectorKind.PASSWORD: _build_password,
    ProtectorKind.STARTUP_KEY: _build_startup_key,
    ProtectorKind.CLEAR: _build_clear,
    ProtectorKind.TPM: _build_tpm,
}


@dataclass
class _MetaState:
    """What a metadata block is built from once the protectors exist (typed, was a dict)."""

    ns: K.NonceSource
    virtualized_sectors: int
    volume_guid: uuid.UUID
    created: int
    entries: list[Entry]


@dataclass
class _Deferred:
    """The part of a plan finished by :meth:`EncryptionPlan.finalize`: the protectors (whose key
    stretches may still run) and what the boot sector and relocated header are built from."""

    src: BlockDevice
    protectors: list[_Protector]
    fvek: bytes
    guid: uuid.UUID
    ns: K.NonceSource
    created: int
    description: str | None
    hidden_sectors: int
    sectors_per_cluster: int
    total_sectors: int
    layout: str

    def close(self) -> None:
        """Stop stretches whose result was not collected."""
        for p in self.protectors:
            if p.stretch is not None:
                p.stretch.job.close()


@dataclass
class EncryptionPlan:
    """Everything decided before the first sector is written: keys (held only in memory), the FVE
    metadata, the boot sector and the relocated header. Build it with :func:`plan_encryption`."""

    method: int
    sector_size: int
    volume_size: int
    regions: FveRegions
    cipher: SectorCipher = field(repr=False)
    result: EncryptResult
    #: (offset, bytes) written over the ciphertext: FVE boot sector, 3 metadata blocks, relocated header.
    overlays: list[tuple[int, bytes]] = field(repr=False)
    _vmk: bytes = field(repr=False, default=b"")
    _state: _MetaState | None = field(repr=False, default=None)
    _deferred: _Deferred | None = field(repr=False, default=None)

    def encrypt_chunk(self, offset: int, plaintext: bytes | bytearray | memoryview) -> bytearray:
        """Ciphertext of the volume span at ``offset`` as it goes to disk (overlays applied)."""
        n = len(plaintext)
        out = bytearray(self.cipher.encrypt(plaintext, offset // self.sector_size))
        for ro, data in self.overlays:
            lo, hi = max(offset, ro), min(offset + n, ro + len(data))
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - ro : hi - ro]
        return out

    def overlay_spans(self) -> list[tuple[int, int]]:
        """(offset, length) of the boot sector area, the metadata blocks and the relocated header."""
        r = self.regions
        return (
            [(0, r.vho_size)] + [(o, S.METADATA_REGION_SIZE) for o in r.metadata_offsets] + [(r.vho_offset, r.vho_size)]
        )

    def overlaps_overlay(self, offset: int, length: int) -> bool:
        """True when the span touches the boot sector, a metadata block or the relocated header."""
        return any(ro < offset + length and offset < ro + n for ro, n in self.overlay_spans())

    def finalize(self) -> EncryptionPlan:
        """Finish the deferred part (protector key stretches, metadata, overlays); idempotent."""
        d, self._deferred = self._deferred, None
        if d is None:
            return self
        try:
            self._finish(d)
        finally:
            d.close()
        return self

    def _finish(self, d: _Deferred) -> None:
        ss, r = self.sector_size, self.regions
        keys = _Keys(self._vmk, d.ns, d.created)
        entries: list[Entry] = [
            unicode_entry(d.description or f"templatetool {K.filetime_to_iso(d.created)}", S.ROLE_DESCRIPTION)
        ]
        results: list[ProtectorResult] = []
        for p in d.protectors:
            nested, res = _BUILDERS[p.spec.kind](p, keys)
            entries.append(_vmk_entry(p.guid, d.created, p.spec.kind.protection, nested))
            results.append(res)
        entries.append(_ccm_entry(self._vmk, K.key_entry(self.method, d.fvek), d.ns, S.ROLE_FVEK))
        entries.append(
            Entry(
                S.ROLE_VOLUME_HEADER_BLOCK,
                S.VT_OFFSET_SIZE,
                S.build(S.OffsetSizePayload, {"offset": r.vho_offset, "size": r.vho_size, "extra": b""}),
            )
        )
        self.result.protectors = results
        self._state = _MetaState(d.ns, r.vho_size // ss, d.guid, d.created, entries)
        block = self.metadata_block()
        boot = build_boot_sector(
            ss,
            r.metadata_offsets,
            hidden_sectors=d.hidden_sectors,
            sectors_per_cluster=d.sectors_per_cluster,
            total_sectors=d.total_sectors,
            layout=d.layout,
        ).ljust(r.vho_size, b"\0")
        vho_ct = self.cipher.encrypt(d.src.read(0, r.vho_size), r.vho_offset // ss)
        self.overlays = [(0, boot)] + [(o, block) for o in r.metadata_offsets] + [(r.vho_offset, vho_ct)]

    def abandon(self) -> None:
        """Stop background work of a plan that will not be finalized (an error happened)."""
        d, self._deferred = self._deferred, None
        if d is not None:
            d.close()

    def metadata_block(self, encrypted_size: int | None = None, state: int | None = None) -> bytes:
        """A 64 KiB metadata block for another conversion state / encrypted size (in-place conversion)."""
        if self._state is None:
            raise UsageError("the plan is not finalized yet")
        m = self._state
        vt, vc = m.ns.next()
        covered = build_metadata_block(
            encrypted_size=self.volume_size if encrypted_size is None else encrypted_size,
            virtualized_sectors=m.virtualized_sectors,
            metadata_offsets=self.regions.metadata_offsets,
            vho_offset=self.regions.vho_offset,
            volume_guid=m.volume_guid,
            nonce_counter=m.ns.counter,
            method=self.method,
            created=m.created,
            entries=m.entries,
            state=S.STATE_ENCRYPTED if state is None else state,
        )
        vccm = K.ccm_wrap(self._vmk, K.key_entry(S.KEYTYPE_VALIDATION_HASH, hashlib.sha256(covered).digest()), vt, vc)
        return finish_metadata_block(covered, vccm).ljust(S.METADATA_REGION_SIZE, b"\0")


def _check_protectors(protectors: list[ProtectorSpec]) -> None:
    if not protectors:
        raise UsageError("at least one key protector is needed", hint="e.g. a recovery password")
    if sum(p.kind is ProtectorKind.RECOVERY_PASSWORD for p in protectors) > 1:
        raise UsageError("only one recovery password protector is read by libbde and dislocker")
    for spec in protectors:
        if spec.kind is ProtectorKind.PASSWORD and not spec.value:
            raise UsageError("a password protector needs a password")
        if spec.kind is ProtectorKind.TPM and spec.seal is None:
            raise UsageError("a TPM protector needs a seal function")


def plan_encryption(
    src: BlockDevice,
    *,
    method: str | int = "xts-aes-128",
    protectors: list[ProtectorSpec],
    regions: FveRegions,
    sector_size: int | None = None,
    description: str | None = None,
    defer: bool = False,
    layout: str = S.LAYOUT_STANDARD,
    engine: Engine | None = None,
) -> EncryptionPlan:
    """Decide keys, protectors and metadata for encrypting the plaintext volume ``src``.

    Fresh FVEK, VMK, salts, GUIDs and nonces on every call. Nothing is written. With ``defer``
    the password/recovery-password key stretches (0x100000 SHA-256 rounds each) run on
    ``engine`` (forked children) and the metadata is built by :meth:`EncryptionPlan.finalize`,
    so the stretch overlaps the pass over the disk; ``cipher`` is usable at once.
    ``layout``: ``standard`` (the fixed-disk ``-FVE-FS-`` volume header) or ``to-go`` (the
    BitLocker To Go header Windows writes on removable media: ``MSWIN4.1``, GUID at 0x1A8).
    """
    _check_protectors(protectors)
    code = _method_code(method)
    head = src.read(0, 512) if src.size >= 512 else b""
    if layout not in S.IDENTIFIER_OFFSET:
        raise UsageError(f"unknown BitLocker volume layout {layout!r}", hint="use standard or to-go")
    if volume_layout(head) is not None:
        raise UsageError("the volume is already BitLocker-encrypted", src.name)
    is_ntfs = head[3:11] == b"NTFS    "
    ntfs_ss = struct.unpack_from("<H", head, 0x0B)[0] if is_ntfs else None
    if sector_size and ntfs_ss and sector_size != ntfs_ss:
        raise UsageError(f"sector size {sector_size} differs from the NTFS sector size {ntfs_ss}", src.name)
    ss = sector_size or ntfs_ss or src.sector_size
    if ss not in (512, 1024, 2048, 4096):
        raise UsageError(f"unsupported sector size {ss}", src.name)
    vsize = src.size
    if vsize % ss:
        raise UsageError(f"volume size {vsize} is not a multiple of the sector size {ss}", src.name)
    check_regions(regions, vsize, ss)

    fvek = K.random_key(S.FVEK_LENGTH[code])
    vmk = K.random_key(32)
    vol_guid = uuid.uuid4()
    ns = K.NonceSource(0)
    eng = engine or default_engine()
    chosen: list[_Protector] = []
    for spec in protectors:
        stretch = (spec._pre or spec._start_stretch(eng, defer)) if spec._stretches() else None
        chosen.append(_Protector(spec, uuid.uuid4(), stretch))
    deferred = _Deferred(
        src,
        chosen,
        fvek,
        vol_guid,
        ns,
        ns.time,
        description,
        hidden_sectors=struct.unpack_from("<I", head, 0x1C)[0] if is_ntfs else 0,
        sectors_per_cluster=head[0x0D] if is_ntfs and head[0x0D] else 8,
        total_sectors=0 if is_ntfs and layout == S.LAYOUT_STANDARD else vsize // ss,
        layout=layout,
    )
    result = EncryptResult(str(vol_guid), S.METHOD_NAMES[code], ss, vsize, regions, [])
    plan = EncryptionPlan(code, ss, vsize, regions, make_cipher(code, fvek, ss), result, [], vmk, _deferred=deferred)
    return plan if defer else plan.finalize()


def encrypt_volume(
    src: BlockDevice,
    dst: BlockDevice,
    *,
    method: str | int = "xts-aes-128",
    protectors: list[ProtectorSpec],
    regions: FveRegions,
    sector_size: int | None = None,
    description: str | None = None,
    taps: PassTaps | None = None,
    engine: Engine | None = None,
    layout: str = S.LAYOUT_STANDARD,
) -> EncryptResult:
    """Encrypt the plaintext volume ``src`` into ``dst`` (same size or larger) in BitLocker format.

    ``regions`` must already be reserved (zero, unused by the filesystem): see
    :mod:`templatetool.bitlocker.reserve`. One streaming pass in 1 MiB chunks, bounded memory
    (a few chunks in flight). Chunks are read and encrypted by the ``engine``'s forked workers
    (:meth:`templatetool.parallel.Engine.map`) and written in order by this process (a single
    writer: two processes writing one file contend on its inode lock, which on this class of VM
    doubled the time). The protectors' key stretches run on the engine meanwhile, and the few
    chunks holding BitLocker's own structures are written last, once the metadata is built.

    ``taps`` (:class:`~templatetool.parallel.PassTaps`): ``skip(offset, length)`` may declare a
    chunk not worth writing (free in the filesystem and unallocated in the source: ``dst`` then
    keeps it unallocated; readers return garbage there, which is harmless for free clusters);
    chunks holding BitLocker's own structures are always written. ``on_skip(offset, length)`` is
    then called in volume order. ``worker_tap(offset, plaintext) -> bytes`` runs in the worker on
    every chunk read (e.g. to hash it) and its result reaches ``on_tap(offset, length, result)``
    here, in volume order. ``tap(offset, plaintext)`` sees every plaintext chunk in this process,
    in order (costs a copy). Skipped chunks are not read and not tapped. ``layout``: see
    :func:`plan_encryption`.
    """
    eng = engine or default_engine()
    t = taps or PassTaps()
    plan = plan_encryption(
        src,
        method=method,
        protectors=protectors,
        regions=regions,
        sector_size=sector_size,
        description=description,
        defer=True,
        layout=layout,
        engine=eng,
    )
    try:
        vsize = plan.volume_size
        ss = plan.sector_size
        if dst.size < vsize:
            raise UsageError(f"output volume ({dst.size} bytes) is smaller than the input ({vsize})", dst.name)
        held: list[tuple[int, bytearray]] = []
        special = {off // CHUNK for o, n in plan.overlay_spans() for off in range(o // CHUNK * CHUNK, o + n, CHUNK)}
        cipher = plan.cipher
        rbuf: list[memoryview] = []
        tap, worker_tap, on_tap, on_skip = t.tap, t.worker_tap, t.on_tap, t.on_skip

        def chunk_fn(off: int, n: int, out: memoryview) -> bytes:
            # runs in a worker process: read, tap, encrypt into the shared slot
            if not rbuf:
                rbuf.append(memoryview(bytearray(CHUNK)))
            data = rbuf[0][:n]
            src.read_into(off, data)
            payload = worker_tap(off, data) if worker_tap is not None else b""
            cipher.encrypt_into(data, off // ss, out)
            if tap is not None:  # the plaintext travels back after the ciphertext (+ room)
                out[n + 16 : 2 * n + 16] = data
            return payload

        slot = 2 * CHUNK + 16 if tap is not None else CHUNK
        items = chunk_items(vsize, CHUNK, t.skip, special)
        with progress(vsize, "encrypt") as bar:
            for off, n, out, payload in eng.map(chunk_fn, items, slot=slot):
                if out is None:
                    if on_skip is not None:
                        on_skip(off, n)
                    bar.update(n)
                    continue
                assert payload is not None
                if tap is not None:
                    tap(off, out[n + 16 : 2 * n + 16])
                if on_tap is not None:
                    on_tap(off, n, payload)
                if off // CHUNK in special:
                    held.append((off, bytearray(out[:n])))
                else:  # one writer: two processes appending to one file contend on its inode lock
                    dst.write(off, out[:n])
                bar.update(n)
        plan.finalize()
        for off, ct in held:
            for ro, d in plan.overlays:
                lo, hi = max(off, ro), min(off + len(ct), ro + len(d))
                if lo < hi:
                    ct[lo - off : hi - off] = d[lo - ro : hi - ro]
            dst.write(off, ct)
        dst.flush()
    except BaseException:
        plan.abandon()
        raise
    return plan.result


def decrypt_volume(
    plain: BlockDevice,
    dst: BlockDevice,
    *,
    skip: SkipFn | None = None,
    engine: Engine | None = None,
    on_skip: SpanFn | None = None,
) -> int:
    """Stream the plaintext view ``plain`` (see :meth:`FveVolume.unlock`) into ``dst``.

    Chunks are read and decrypted by the ``engine``'s forked workers and written here, in order.
    Chunks ``skip(offset, length)`` declares skippable are not read and, like all-zero chunks,
    not written (a new ``dst`` keeps them unallocated); ``on_skip(offset, length)`` is called for
    each skipped span, in order. Returns the number of bytes written.
    """
    from ..blockdev import is_zero

    eng = engine or default_engine()
    fast = getattr(plain, "read_chunk_into", None)

    def chunk_fn(off: int, n: int, out: memoryview) -> bytes:
        # in a worker: read + decrypt into the shared slot; zero chunks are not written
        if fast is not None:
            fast(off, n, out)
        else:
            out[:n] = plain.read(off, n)
        return b"\0" if is_zero(out[:n]) else b"\1"

    written = 0
    with progress(plain.size, "decrypt") as bar:
        items = chunk_items(plain.size, CHUNK, skip)
        for off, n, data, flag in eng.map(chunk_fn, items):
            if data is None:
                if on_skip is not None:
                    on_skip(off, n)
            elif flag == b"\1":
                dst.write(off, data[:n])
                written += n
            bar.update(n)
    dst.flush()
    return written


def summary(view: BlockDevice) -> dict[str, Any] | None:
    """BitLocker details of a volume for ``inspect`` (None when it is not BitLocker)."""
    if not is_bitlocker(view):
        return None
    try:
        return open_fve(view).info()
    except TemplateToolError as e:
        return {"status": "unreadable", "error": str(e)}


def plan_from_metadata(
    meta: Metadata, vmk: bytes, fvek: bytes, *, volume_size: int, sector_size: int, vho_size: int
) -> EncryptionPlan:
    """Rebuild an :class:`EncryptionPlan` from an existing volume's metadata and its VMK/FVEK.

    Used to resume an in-place conversion: the keys, protectors, volume GUID and creation time
    stay those already on disk; ``metadata_block`` then builds fresh blocks (new CCM nonces: a new
    FILETIME) for any state / encrypted size. ``overlays`` is empty (the caller rebuilds the boot
    sector and relocated header from the plaintext it holds).
    """
    regions = FveRegions(meta.metadata_offsets, meta.vho_offset, vho_size)
    code = meta.method
    entries = [Entry(e.role, e.vtype, e.payload, e.version) for e in meta.entries]
    prots = []
    for e in meta.entries_of(S.ROLE_VMK, S.VT_VMK):
        p = S.VmkPayload.parse(e.payload)
        kind: ProtectorKind | str = ProtectorKind.of_protection(p.protection) or S.PROTECTION_NAMES.get(
            p.protection, "unknown"
        )
        prots.append(ProtectorResult(kind, str(uuid.UUID(bytes_le=p.guid)), p.protection))
    result = EncryptResult(str(meta.volume_guid), S.METHOD_NAMES[code], sector_size, volume_size, regions, prots)
    state = _MetaState(
        K.NonceSource(meta.nonce_counter + 1), meta.virtualized_sectors, meta.volume_guid, meta.created, entries
    )
    return EncryptionPlan(
        code, sector_size, volume_size, regions, make_cipher(code, fvek, sector_size), result, [], vmk, _state=state
    )
