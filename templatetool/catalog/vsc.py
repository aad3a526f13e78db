"""Signed catalogs: sign, read (from a .vsc file or a template disk), verify against a disk."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from ..blockdev import BlockDevice
from ..cms.signed import SignedDataInfo, sign_data, verify_signed_data
from ..errors import FormatError, IntegrityError, NotFoundError, ResourceError, UnsupportedError
from ..signers.base import Signer
from ..signers.certs import thumbprint
from . import VSC_METADATA_GUID
from .document import CatalogDocument
from .measure import FREE_NONE, FREE_NTFS, measure_volume
from .merkle import differing, level


@dataclass
class VscInfo:
    """A verified signed catalog: the document and who signed it."""

    document: CatalogDocument
    cms: SignedDataInfo
    der: bytes

    @property
    def name(self) -> str:
        return self.document.name

    @property
    def version(self) -> tuple[int, int, int, int]:
        return self.document.version

    @property
    def signer_cert(self) -> x509.Certificate:
        return self.cms.signer_cert

    @property
    def signer_thumbprint(self) -> str:
        """SHA-1 thumbprint of the signing certificate (upper-case hex, Windows style)."""
        return thumbprint(self.cms.signer_cert)

    def to_json(self) -> dict[str, Any]:
        return {"catalog": self.document.summary(), "signature": self.cms.to_json()}


def sign_catalog(doc: CatalogDocument, signer: Signer, *, pss: bool = False) -> bytes:
    """DER CMS SignedData over the canonical document bytes (id-data content, exact bytes)."""
    return sign_data(doc.to_bytes(), signer, pss=pss)


def open_vsc(der: bytes, *, trust: list[x509.Certificate] | None = None, at: _dt.datetime | None = None) -> VscInfo:
    """Verify a signed catalog's signature (and trust) and parse its document."""
    info = verify_signed_data(der, trust=trust, at=at)
    return VscInfo(CatalogDocument.from_bytes(info.content), info, bytes(der))


def read_vsc_bytes(path: str | os.PathLike[str]) -> bytes:
    """The signed catalog from a ``.vsc`` file or from a template disk's VHDX metadata."""
    from ..disk import disk_format

    p = str(path)
    if disk_format(p) == "vhdx":
        from ..vhdx import open_vhdx

        disk = open_vhdx(p)
        try:
            data = disk.get_user_metadata(VSC_METADATA_GUID)
        except NotFoundError:
            data = None  # the VHDX has no catalog item: say so in the user's terms below
        finally:
            disk.close()
        if not data:
            raise _not_protected(p, "no volume signature catalog in its VHDX metadata")
        return bytes(data)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x30" or size > 64 << 20:
            # Not a DER .vsc: a raw template disk keeps its catalog beside it.
            sidecar = p + ".vsc"
            if os.path.exists(sidecar):
                with open(sidecar, "rb") as g:
                    return g.read()
            if size >= 1 << 20 and _looks_like_disk(p):
                e = _not_protected(p, f"no volume signature catalog: {os.path.basename(sidecar)} is absent")
                raise FormatError(e.what, e.where, e.hint)  # exit 3, as before: not a catalog
            raise FormatError(
                "not a .vsc file (DER CMS) nor a template disk with a catalog",
                p,
                "give a .vsc file or a protected template disk",
            )
        with open(p, "rb") as f:
            return f.read()
    except OSError as e:
        raise ResourceError(f"cannot read: {e.strerror}", p) from None


def _not_protected(path: str, why: str) -> NotFoundError:
    return NotFoundError(
        f"{os.path.basename(path)} is not a protected template ({why})",
        path,
        "run `templatetool protect` on it first, or give the protected template disk",
    )


def _looks_like_disk(path: str) -> bool:
    """A raw disk image: an MBR/protective-MBR boot signature in sector 0."""
    try:
        with open(path, "rb") as f:
            return f.read(512)[510:512] == b"\x55\xaa"
    except OSError:
        return False


@dataclass
class VerifyReport:
    """Outcome of verifying a template disk against its catalog."""

    ok: bool
    name: str
    version: str
    signer: str
    signer_thumbprint: str
    expected_root: str
    actual_root: str | None = None
    problems: list[str] = field(default_factory=list)
    changed: list[dict[str, int]] = field(default_factory=list)
    files: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for o, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= o:
            po, pn = out[-1]
            out[-1] = (po, max(po + pn, o + n) - po)
        else:
            out.append((o, n))
    return out


def compare_volume(
    view: BlockDevice, doc: CatalogDocument, *, name_files: bool = True, workers: int | None = None
) -> tuple[str, list[dict[str, int]], list[dict[str, object]]]:
    """Measure ``view`` like the catalog says; return (actual root hex, changed ranges, files).

    Changed ranges are volume byte ranges at the catalog's detail granularity
    (``block_size · 2^detail_level`` bytes), merged when adjacent.
    """
    if view.size != doc.volume.size:
        raise IntegrityError(f"volume size {view.size} differs from the catalog's {doc.volume.size}", view.name)
    if doc.free_space not in (FREE_NTFS, FREE_NONE):
        raise UnsupportedError(f"free-space mode {doc.free_space!r} is not supported")
    m = measure_volume(view, doc.block_size, free_space=doc.free_space, workers=workers, desc="verifying")
    if m.root == doc.root:
        return m.root.hex(), [], []
    mine = level(m.leaves, doc.detail_level)
    span = doc.block_size << doc.detail_level
    rngs = _merge([(i * span, min(span, view.size - i * span)) for i in differing(mine, doc.detail)])
    files: list[dict[str, object]] = []
    if name_files and doc.free_space == FREE_NTFS:
        from .ntfs import files_in_ranges

        try:
            files = files_in_ranges(view, rngs)
        except FormatError:
            files = []
    return m.root.hex(), [{"offset": o, "length": n} for o, n in rngs], files


def locate_volume(dev: BlockDevice, doc: CatalogDocument) -> BlockDevice:
    """The volume the catalog describes on ``dev`` (by partition GUID, else index/offset)."""
    from ..blockdev import View
    from ..disk import read_partition_table

    v = doc.volume
    if v.partition_index is None:
        return View(dev, 0, dev.size, name=dev.name)
    table = read_partition_table(dev)
    for p in table.partitions:
        if v.partition_guid and p.guid and str(p.guid) == v.partition_guid:
            break
    else:
        raise IntegrityError(
            "the catalog's partition is not on this disk", dev.name, f"expected partition GUID {v.partition_guid}"
        )
    if p.offset != v.partition_offset or p.size != v.size:
        raise IntegrityError(
            f"partition {p.index} geometry differs from the catalog "
            f"({p.offset}+{p.size} vs {v.partition_offset}+{v.size})",
            dev.name,
        )
    return p.view(dev)


def verify_template(
    path: str | os.PathLike[str],
    *,
    vsc: bytes | None = None,
    trust: list[x509.Certificate] | None = None,
    at: _dt.datetime | None = None,
    name_files: bool = True,
) -> VerifyReport:
    """Verify a template disk: catalog signature and certificate, then catalog ↔ disk content.

    Signature/certificate failures raise (IntegrityError / PolicyError); a content mismatch
    returns a report with ``ok=False`` and the changed ranges and files.
    """
    import time

    from ..disk import open_disk, sniff_filesystem

    t0 = time.perf_counter()
    der = vsc if vsc is not None else read_vsc_bytes(path)
    info = open_vsc(der, trust=trust, at=at)
    doc = info.document
    rep = VerifyReport(
        ok=False,
        name=doc.name,
        version=doc.version_str,
        signer=info.signer_cert.subject.rfc4514_string(),
        signer_thumbprint=info.signer_thumbprint,
        expected_root=doc.root.hex(),
    )
    dev = open_disk(path)
    try:
        view = locate_volume(dev, doc)
        fs = sniff_filesystem(view)
        if fs == "bitlocker":
            raise UnsupportedError(
                "the volume is BitLocker-encrypted",
                str(path),
                "verify the decrypted volume (templatetool unlock) instead",
            )
        actual, changed, files = compare_volume(view, doc, name_files=name_files)
    finally:
        dev.close()
    rep.actual_root = actual
    rep.changed = changed
    rep.files = files
    rep.ok = not changed and actual == rep.expected_root
    if not rep.ok:
        rep.problems.append(f"{len(changed)} region(s) of the volume differ from the catalog")
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep
