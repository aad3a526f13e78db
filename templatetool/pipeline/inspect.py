"""`inspect`: describe a disk (container, partition table, volumes, BitLocker status)."""

from __future__ import annotations

import os
from typing import Any

from ..blockdev import BlockDevice
from ..disk import disk_format, open_disk, read_partition_table, sniff_filesystem
from ..errors import TemplateToolError


def _container(path: str | os.PathLike[str], dev: BlockDevice) -> dict[str, Any]:
    fmt = disk_format(path)
    info: dict[str, Any] = {
        "path": str(path),
        "format": fmt,
        "virtual_size": dev.size,
        "logical_sector_size": dev.sector_size,
        "file_size": os.path.getsize(path),
    }
    if fmt == "vhdx":
        info["subformat"] = getattr(dev, "subformat", None)
        info["block_size"] = getattr(dev, "block_size", None)
        info["physical_sector_size"] = getattr(dev, "physical_sector_size", None)
        vid = getattr(dev, "virtual_disk_id", None)
        info["virtual_disk_id"] = str(vid) if vid else None
        alloc = getattr(dev, "allocated_bytes", None)
        info["allocated_bytes"] = alloc() if callable(alloc) else None
        chain = getattr(dev, "parent_chain", None)
        info["parent_chain"] = [str(p) for p in chain()] if callable(chain) else []
        um = getattr(dev, "user_metadata", None)
        items = um() if callable(um) else []
        info["user_metadata"] = [
            {"guid": str(it[0]), "size": it[1], "virtual_disk": bool(it[2])} if isinstance(it, tuple) else it
            for it in items
        ]
    else:
        info["allocated_bytes"] = sum(n for _, n in dev.allocated_ranges())
    return info


def _bitlocker(view: BlockDevice) -> dict[str, Any] | None:
    from ..bitlocker import bitlocker_summary

    try:
        return bitlocker_summary(view)
    except TemplateToolError as e:
        return {"status": "unreadable", "error": str(e)}


def describe_disk(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``templatetool inspect`` shows, as a JSON-ready dict."""
    with open_disk(path) as dev:
        result: dict[str, Any] = {"container": _container(path, dev)}
        table = read_partition_table(dev)
        result["partition_table"] = {
            "scheme": table.scheme,
            "disk_guid": str(table.disk_guid) if table.disk_guid else None,
            "warnings": table.warnings,
        }
        volumes = []
        targets = [(p, p.view(dev)) for p in table.partitions] if table.scheme else [(None, dev)]
        for part, view in targets:
            fs = sniff_filesystem(view)
            vol: dict[str, Any] = (
                part.to_json() if part else {"index": 0, "offset": 0, "size": dev.size, "kind": "volume"}
            )
            vol["filesystem"] = fs
            vol["bitlocker"] = _bitlocker(view) if fs in ("bitlocker", "bitlocker-to-go") else None
            volumes.append(vol)
        result["volumes"] = volumes
        return result
