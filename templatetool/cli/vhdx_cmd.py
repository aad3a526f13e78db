"""`templatetool vhdx ...`: convert, create, check and user metadata (thin layer over templatetool.vhdx)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..atomic import write_bytes_atomic
from ..errors import IntegrityError, UsageError
from .common import SIZE, emit, human_size, json_option, renamed
from .policy import OUTPUT_FILE


def register(cli: click.Group) -> None:
    """Add the ``vhdx`` command group to ``cli``."""

    @cli.group("vhdx")
    def vhdx() -> None:
        """VHDX virtual disks: convert, create, check, user metadata."""

    @vhdx.command("convert")
    @click.argument("src", type=click.Path(dir_okay=False))
    @click.argument("dst", type=OUTPUT_FILE)
    @click.option(
        "--to",
        "to",
        type=click.Choice(["raw", "vhdx"]),
        default=None,
        help="Output format (default: vhdx when DST ends in .vhdx/.avhdx, else raw).",
    )
    @click.option(
        "--subformat",
        type=click.Choice(["dynamic", "fixed"]),
        default="dynamic",
        show_default=True,
        help="VHDX layout: dynamic (grows) or fixed (preallocated).",
    )
    @click.option("--block-size", type=SIZE, default=None, help="VHDX block size, 1M..256M (default 32M).")
    @click.option(
        "--parent-dir",
        "parent_dirs",
        multiple=True,
        type=click.Path(),
        help="Extra folder (or file) to look for a moved parent of a differencing SRC in.",
    )
    @click.option(
        "--logical-sector-size",
        type=click.Choice(["512", "4096"]),
        default=None,
        help="Sector size of a raw SRC (default: from its GPT, else 512).",
    )
    @json_option
    def convert_cmd(
        src: str,
        dst: str,
        to: str | None,
        subformat: str,
        block_size: int | None,
        parent_dirs: tuple[str, ...],
        logical_sector_size: str | None,
        as_json: bool,
    ) -> None:
        """Convert SRC (raw or VHDX, by signature) to DST, keeping zero/unallocated blocks sparse."""
        from ..vhdx import convert

        fmt = to or ("vhdx" if dst.lower().endswith((".vhdx", ".avhdx")) else "raw")
        res = convert(
            src,
            dst,
            to=fmt,
            subformat=subformat,
            block_size=block_size,
            progress=not as_json,
            parent_search=list(parent_dirs) or None,
            logical_sector_size=int(logical_sector_size) if logical_sector_size else None,
        )
        res = renamed(res, source="input", destination="output", file_size="size")
        emit(
            res,
            as_json,
            lambda r: (
                f"{r['output']}: {r['format']}"
                + (f" ({r['subformat']})" if r["subformat"] else "")
                + f", {human_size(r['virtual_size'])} virtual, {human_size(r['size'])} file"
            ),
        )

    @vhdx.command("create")
    @click.argument("dst", type=OUTPUT_FILE)
    @click.option("--size", type=SIZE, default=None, help="Virtual size (e.g. 64M, 10G); not with --parent.")
    @click.option(
        "--subformat",
        type=click.Choice(["dynamic", "fixed"]),
        default="dynamic",
        show_default=True,
        help="VHDX layout: dynamic (grows) or fixed (preallocated).",
    )
    @click.option("--block-size", type=SIZE, default=None, help="Block size, 1M..256M (default 32M).")
    @click.option(
        "--logical-sector-size",
        type=click.Choice(["512", "4096"]),
        default="512",
        show_default=True,
        help="Logical sector size the guest sees.",
    )
    @click.option(
        "--physical-sector-size",
        type=click.Choice(["512", "4096"]),
        default="4096",
        show_default=True,
        help="Physical sector size reported to the guest.",
    )
    @click.option(
        "--parent", type=click.Path(dir_okay=False), default=None, help="Make a differencing child of this VHDX."
    )
    @json_option
    def create_cmd(
        dst: str,
        size: int | None,
        subformat: str,
        block_size: int | None,
        logical_sector_size: str,
        physical_sector_size: str,
        parent: str | None,
        as_json: bool,
    ) -> None:
        """Create an empty VHDX (fixed, dynamic, or a differencing child of --parent)."""
        from ..vhdx import create_vhdx

        if parent is None and size is None:
            raise UsageError("--size is required (unless --parent is given)")
        d = create_vhdx(
            dst,
            size,
            subformat=subformat,
            block_size=block_size,
            logical_sector_size=int(logical_sector_size),
            physical_sector_size=int(physical_sector_size),
            parent=parent,
        )
        try:
            res = {
                "output": dst,
                "subformat": d.subformat,
                "virtual_size": d.size,
                "block_size": d.block_size,
                "logical_sector_size": d.logical_sector_size,
                "physical_sector_size": d.physical_sector_size,
                "virtual_disk_id": str(d.virtual_disk_id),
                "parent_chain": [str(p) for p in d.parent_chain()],
            }
        finally:
            d.close()
        emit(
            res,
            as_json,
            lambda r: (
                f"{r['output']}: {r['subformat']} VHDX, {human_size(r['virtual_size'])}, "
                f"block {human_size(r['block_size'])}"
            ),
        )

    @vhdx.command("check")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.option("--cross-check", is_flag=True, help="Also compare every byte with libvhdi (pyvhdi).")
    @click.option(
        "--parent-dir",
        "parent_dirs",
        multiple=True,
        type=click.Path(),
        help="Extra folder (or file) to look for a moved parent in.",
    )
    @json_option
    def check_cmd(disk: str, cross_check: bool, parent_dirs: tuple[str, ...], as_json: bool) -> None:
        """Validate DISK's structures (exit 0 when clean, 4 when problems are found)."""
        from ..vhdx import check
        from ..vhdx import cross_check as xcheck

        findings = check(disk, parent_search=list(parent_dirs) or None)
        if cross_check and not any(f.severity == "error" for f in findings):
            findings += xcheck(disk, parent_search=list(parent_dirs) or None)
        errors = [f for f in findings if f.severity == "error"]
        res = {"path": disk, "ok": not errors, "findings": [f.to_json() for f in findings]}
        emit(
            res,
            as_json,
            lambda r: "\n".join(str(f) for f in findings) or f"{disk}: no problems found",
            error=IntegrityError(f"check found {len(errors)} problem(s)", disk) if errors else None,
        )

    @vhdx.command("replay-log")
    @click.argument("src", type=click.Path(dir_okay=False))
    @click.argument("dst", type=OUTPUT_FILE)
    @json_option
    def replay_cmd(src: str, dst: str, as_json: bool) -> None:
        """Write DST: a copy of SRC with its unreplayed log applied (SRC is not modified)."""
        from ..vhdx import replay_log

        res = renamed(replay_log(src, dst), source="input", destination="output")
        emit(
            res,
            as_json,
            lambda r: (
                f"{r['output']}: replayed {r['entries']} log entr"
                f"{'y' if r['entries'] == 1 else 'ies'} ({r['sectors_written']} sectors)"
            ),
        )

    @vhdx.group("metadata")
    def metadata() -> None:
        """User metadata items (IsUser=1) of a VHDX."""

    @metadata.command("list")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @json_option
    def md_list(disk: str, as_json: bool) -> None:
        """List user metadata items: GUID, size, IsVirtualDisk."""
        from ..vhdx import open_vhdx

        with open_vhdx(disk) as d:
            items = [{"guid": str(g), "size": n, "virtual_disk": vd} for g, n, vd in d.user_metadata()]
        emit(
            items,
            as_json,
            lambda r: (
                "\n".join(
                    f"{i['guid']}  {i['size']} bytes" + ("  virtual-disk" if i["virtual_disk"] else "  file") for i in r
                )
                or "no user metadata items"
            ),
        )

    @metadata.command("get")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.argument("guid")
    @click.option("-o", "--output", type=OUTPUT_FILE, default=None, help="Write the item here (default: stdout).")
    def md_get(disk: str, guid: str, output: str | None) -> None:
        """Print (or save) the bytes of user item GUID."""
        from ..vhdx import open_vhdx

        with open_vhdx(disk) as d:
            data = d.get_user_metadata(guid)
        if output:
            write_bytes_atomic(output, data)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    @metadata.command("set")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.argument("guid")
    @click.argument("file", type=click.Path(dir_okay=False, exists=True))
    @click.option("--file-level", is_flag=True, help="IsVirtualDisk=0: do not copy the item into children.")
    @json_option
    def md_set(disk: str, guid: str, file: str, file_level: bool, as_json: bool) -> None:
        """Add or replace user item GUID with the bytes of FILE (rotates DataWriteGuid)."""
        from ..vhdx import open_vhdx

        data = Path(file).read_bytes()
        with open_vhdx(disk, writable=True) as d:
            d.set_user_metadata(guid, data, virtual_disk=not file_level)
        emit({"path": disk, "guid": guid, "size": len(data)}, as_json, f"{disk}: set {guid} ({len(data)} bytes)")

    @metadata.command("remove")
    @click.argument("disk", type=click.Path(dir_okay=False))
    @click.argument("guid")
    @json_option
    def md_remove(disk: str, guid: str, as_json: bool) -> None:
        """Remove user item GUID (rotates DataWriteGuid)."""
        from ..vhdx import open_vhdx

        with open_vhdx(disk, writable=True) as d:
            d.remove_user_metadata(guid)
        emit({"path": disk, "guid": guid, "removed": True}, as_json, f"{disk}: removed {guid}")
