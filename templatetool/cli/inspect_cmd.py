"""`templatetool inspect DISK`."""

from __future__ import annotations

from typing import Any

import click

from .. import api
from .common import emit, human_size, json_option


def _text(r: dict[str, Any]) -> str:
    c = r["container"]
    lines = [f"{c['path']}: {c['format']}" + (f" ({c.get('subformat')})" if c.get("subformat") else "")]
    lines.append(f"  virtual size  {human_size(c['virtual_size'])} ({c['virtual_size']} bytes)")
    lines.append(
        f"  sectors       logical {c['logical_sector_size']}"
        + (f", physical {c['physical_sector_size']}" if c.get("physical_sector_size") else "")
    )
    if c.get("block_size"):
        lines.append(f"  block size    {human_size(c['block_size'])}")
    if c.get("allocated_bytes") is not None:
        lines.append(f"  allocated     {human_size(c['allocated_bytes'])}")
    if c.get("virtual_disk_id"):
        lines.append(f"  disk id       {c['virtual_disk_id']}")
    for p in c.get("parent_chain") or []:
        lines.append(f"  parent        {p}")
    for it in c.get("user_metadata") or []:
        lines.append(f"  user metadata {it['guid']} ({it['size']} bytes)")
    pt = r["partition_table"]
    lines.append(
        f"partition table: {pt['scheme'] or 'none (bare volume)'}"
        + (f" disk {pt['disk_guid']}" if pt.get("disk_guid") else "")
    )
    for w in pt["warnings"]:
        lines.append(f"  warning: {w}")
    for v in r["volumes"]:
        lines.append(
            f"  #{v['index']} {v['kind']:<16} offset {v['offset']:>12} size {human_size(v['size']):>10}  "
            f"fs {v['filesystem'] or '-'}" + (f'  "{v["name"]}"' if v.get("name") else "")
        )
        bl = v.get("bitlocker")
        if bl:
            lines.append(f"      bitlocker: {bl.get('method', bl.get('status', ''))}")
            for k in ("sector_size", "volume_guid", "encrypted_size"):
                if k in bl:
                    lines.append(f"        {k}: {bl[k]}")
            for pr in bl.get("protectors", []):
                lines.append(f"        protector {pr.get('type')} {pr.get('guid', '')} {pr.get('created', '')}")
            for cp in bl.get("copies", []):
                lines.append(f"        metadata copy @{cp.get('offset')}: {'valid' if cp.get('valid') else 'INVALID'}")
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    @cli.command("inspect")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @json_option
    def inspect(disk: str, as_json: bool) -> None:
        """Describe DISK (raw or VHDX): container, partitions, filesystems, BitLocker status."""
        emit(api.inspect(disk).to_json(), as_json, _text)
