"""The catalog document: canonical JSON, versioned (docs/formats/vsc.md).

Canonical form: UTF-8 JSON, keys sorted, no insignificant whitespace (``separators=(",", ":")``),
integers only (no floats), no duplicate keys. :func:`CatalogDocument.from_bytes` refuses any
other encoding, so one document has exactly one byte form and the CMS signature covers it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..canonical import canonical_json, parse_strict
from ..errors import FormatError, UnsupportedError, UsageError
from . import VSC_FORMAT, VSC_FORMAT_VERSION
from .merkle import HASH_SIZE, level, root_from

#: Tree construction identifier (catalog/merkle.py).
TREE_ID = "templatetool-merkle-v1"
#: The most detail nodes a catalog stores (512 KiB of hashes: fits a 1 MiB VHDX metadata item).
MAX_DETAIL_NODES = 16384

_VERSION_RE = re.compile(r"^(\d{1,5})\.(\d{1,5})\.(\d{1,5})\.(\d{1,5})$")


#: A template version ``(major, minor, build, revision)``.
Version = tuple[int, int, int, int]


def parse_version(text: str) -> Version:
    """Parse ``a.b.c.d`` (each part 0..65535, like .NET System.Version)."""
    m = _VERSION_RE.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise UsageError(f"bad version {text!r}", hint="use a.b.c.d with each part an integer below 65536")
    a, b, c, d = (int(x) for x in m.groups())
    if any(p > 65535 for p in (a, b, c, d)):
        raise UsageError(f"bad version {text!r}: each part must be below 65536")
    return (a, b, c, d)


def as_version(v: str | Sequence[int]) -> Version:
    """A version from ``a.b.c.d`` text or a 4-item sequence of ints."""
    if isinstance(v, str):
        return parse_version(v)
    a, b, c, d = v
    return (a, b, c, d)


def format_version(v: Sequence[int]) -> str:
    """``(1, 2, 3, 4)`` → ``'1.2.3.4'``."""
    return ".".join(str(x) for x in v)


@dataclass
class VolumeInfo:
    """Geometry of the measured volume."""

    size: int
    sector_size: int
    filesystem: str | None
    cluster_size: int | None = None
    partition_index: int | None = None
    partition_offset: int | None = None
    partition_guid: str | None = None
    partition_type: str | None = None
    partition_name: str = ""
    disk_guid: str | None = None

    def to_json(self) -> dict[str, Any]:
        part = None
        if self.partition_index is not None:
            part = {
                "index": self.partition_index,
                "offset": self.partition_offset,
                "guid": self.partition_guid,
                "type_guid": self.partition_type,
                "name": self.partition_name,
            }
        return {
            "size": self.size,
            "sector_size": self.sector_size,
            "filesystem": self.filesystem,
            "cluster_size": self.cluster_size,
            "partition": part,
            "disk_guid": self.disk_guid,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VolumeInfo:
        p = d.get("partition")
        _expect(d, {"size": int, "sector_size": int}, "volume")
        if p is not None:
            _expect(p, {"index": int, "offset": int}, "volume.partition")
        return cls(
            size=d["size"],
            sector_size=d["sector_size"],
            filesystem=d.get("filesystem"),
            cluster_size=d.get("cluster_size"),
            partition_index=p["index"] if p else None,
            partition_offset=p["offset"] if p else None,
            partition_guid=p.get("guid") if p else None,
            partition_type=p.get("type_guid") if p else None,
            partition_name=p.get("name", "") if p else "",
            disk_guid=d.get("disk_guid"),
        )


def _expect(d: object, fields: dict[str, type], where: str) -> None:
    if not isinstance(d, dict):
        raise FormatError(f"catalog field {where} must be an object")
    for k, t in fields.items():
        v = d.get(k)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise FormatError(f"catalog field {where}.{k} missing or not {t.__name__}")


@dataclass
class CatalogDocument:
    """A Volume Signature Catalog document (unsigned)."""

    name: str
    version: tuple[int, int, int, int]
    volume: VolumeInfo
    block_size: int
    block_count: int
    free_space: str
    root: bytes
    detail_level: int
    detail: list[bytes]
    created: str = ""
    tool_version: str = __version__
    reserved: list[dict[str, Any]] = field(default_factory=list)
    hash_name: str = "sha256"
    tree: str = TREE_ID
    format_version: int = VSC_FORMAT_VERSION

    @classmethod
    def build(
        cls,
        name: str,
        version: str | tuple[int, int, int, int],
        volume: VolumeInfo,
        block_size: int,
        leaves: list[bytes],
        root: bytes,
        free_space: str,
        reserved: list[dict[str, Any]] | None = None,
        created: _dt.datetime | None = None,
        max_detail_nodes: int = MAX_DETAIL_NODES,
    ) -> CatalogDocument:
        """Make a document from a measurement (stores the finest level that fits)."""
        from .merkle import detail_level_for

        if not name or len(name) > 256 or any(ord(c) < 32 for c in name):
            raise UsageError(f"bad template name {name!r}", hint="use 1-256 printable characters")
        ver = as_version(version)
        k = detail_level_for(len(leaves), max_detail_nodes)
        when = (created or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC)
        return cls(
            name=name,
            version=ver,
            volume=volume,
            block_size=block_size,
            block_count=len(leaves),
            free_space=free_space,
            root=root,
            detail_level=k,
            detail=level(leaves, k),
            created=when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            reserved=list(reserved or []),
        )

    @property
    def version_str(self) -> str:
        return format_version(self.version)

    def to_json(self) -> dict[str, Any]:
        """The document as a JSON value (what ``to_bytes`` encodes)."""
        return {
            "format": VSC_FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version_str,
            "created": self.created,
            "tool": {"name": "templatetool", "version": self.tool_version},
            "volume": self.volume.to_json(),
            "measurement": {
                "hash": self.hash_name,
                "tree": self.tree,
                "block_size": self.block_size,
                "block_count": self.block_count,
                "free_space": self.free_space,
                "root": self.root.hex(),
                "detail_level": self.detail_level,
                "detail": base64.b64encode(b"".join(self.detail)).decode("ascii"),
            },
            "reserved": self.reserved,
        }

    def summary(self) -> dict[str, Any]:
        """The document without the detail hashes (for display)."""
        d = self.to_json()
        d["measurement"] = dict(d["measurement"])
        d["measurement"]["detail"] = f"<{len(self.detail)} hashes>"
        return d

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes."""
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> CatalogDocument:
        """Parse and validate canonical bytes (FormatError/UnsupportedError otherwise)."""
        obj = parse_strict(data, "catalog document")
        if not isinstance(obj, dict) or obj.get("format") != VSC_FORMAT:
            raise FormatError("not a templatetool volume signature catalog document")
        fv = obj.get("format_version")
        if fv != VSC_FORMAT_VERSION:
            raise UnsupportedError(
                f"catalog format version {fv} is not supported",
                hint=f"this templatetool reads version {VSC_FORMAT_VERSION}",
            )
        if canonical_json(obj) != data:
            raise FormatError("the catalog document is not in canonical form")
        _expect(
            obj,
            {
                "name": str,
                "version": str,
                "created": str,
                "volume": dict,
                "measurement": dict,
                "tool": dict,
                "reserved": list,
            },
            "catalog",
        )
        m = obj["measurement"]
        _expect(
            m,
            {
                "hash": str,
                "tree": str,
                "block_size": int,
                "block_count": int,
                "free_space": str,
                "root": str,
                "detail_level": int,
                "detail": str,
            },
            "measurement",
        )
        unknown = set(m) - {"hash", "tree", "block_size", "block_count", "free_space", "root", "detail_level", "detail"}
        if unknown:
            raise UnsupportedError(
                f"unknown measurement fields {sorted(unknown)}", hint="a newer templatetool wrote this catalog"
            )
        if m["hash"] != "sha256" or m["tree"] != TREE_ID:
            raise UnsupportedError(f"measurement {m['hash']}/{m['tree']} is not supported")
        try:
            version = parse_version(obj["version"])
        except UsageError as e:
            raise FormatError(str(e)) from None
        vol = VolumeInfo.from_json(obj["volume"])
        bs, bc, k = m["block_size"], m["block_count"], m["detail_level"]
        if bs <= 0 or bs % 512 or vol.size <= 0 or bc != (vol.size + bs - 1) // bs or not 0 <= k <= 64:
            raise FormatError("inconsistent measurement geometry in the catalog")
        try:
            root = bytes.fromhex(m["root"])
            raw = base64.b64decode(m["detail"], validate=True)
        except ValueError:
            raise FormatError("bad root or detail encoding in the catalog") from None
        want = bc
        for _ in range(k):
            want = (want + 1) // 2
        if len(root) != HASH_SIZE or len(raw) != want * HASH_SIZE:
            raise FormatError("the catalog's detail hashes do not match its block count")
        detail = [raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)]
        if root_from(detail) != root:
            raise FormatError("the catalog's detail hashes do not add up to its root")
        return cls(
            name=obj["name"],
            version=version,
            volume=vol,
            block_size=bs,
            block_count=bc,
            free_space=m["free_space"],
            root=root,
            detail_level=k,
            detail=detail,
            created=obj["created"],
            tool_version=str(obj["tool"].get("version", "")),
            reserved=obj["reserved"],
            hash_name=m["hash"],
            tree=m["tree"],
            format_version=fv,
        )


def uuid_str(u: uuid.UUID | None) -> str | None:
    """A GUID as lower-case text (or None)."""
    return str(u) if u else None
