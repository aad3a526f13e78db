"""Protect a Linux golden disk: LUKS2 root, the boot chain (ESP) measured into a signed VSC.

Input: a GPT disk with an EFI system partition (the UKI the VM boots) and one Linux root
partition holding ext2/3/4 whose filesystem ends at least 16 MiB before the partition does (the
LUKS2 header and keyslots take the first 16 MiB, as ``cryptsetup reencrypt --encrypt
--reduce-device-size 32M`` needs the same room). Output (never in place, atomic): the same disk
with the root partition replaced by a LUKS2 volume whose data segment holds the filesystem, and a
VSC over the ESP (every byte measured, free-space mode ``none``) — VHDX user metadata for a .vhdx
output, ``OUT.vsc`` beside a raw one. ``templatetool vsc verify OUT`` checks it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_outputs
from ..blockdev import BlockDevice
from ..catalog import DEFAULT_BLOCK_SIZE
from ..catalog.document import CatalogDocument, VolumeInfo, parse_version, uuid_str
from ..catalog.measure import FREE_NONE, measure_volume
from ..disk.partitions import Partition, PartitionTable
from ..errors import FormatError, PolicyError, UsageError
from ..luks.metadata import DATA_OFFSET
from ..luks.volume import KEY_SIZE, KeyslotSpec, build_metadata_region, encrypt_data
from ..progress import progress
from ..signers.base import Signer
from .protect import _copy_outside, _sign_into

ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
#: Discoverable Partitions Specification: root (x86-64), and the generic Linux filesystem type.
LINUX_ROOT_X86_64 = uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
LINUX_FILESYSTEM = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
_EXT_MAGIC = b"\x53\xef"


def ext_size(view: BlockDevice) -> int | None:
    """Bytes the ext2/3/4 filesystem on ``view`` spans (superblock blocks count x block size),
    or None when it is not ext."""
    if view.size < 2048:
        return None
    sb = view.read(1024, 1024)
    if sb[0x38:0x3A] != _EXT_MAGIC:
        return None
    blocks = int.from_bytes(sb[0x04:0x08], "little")
    if int.from_bytes(sb[0x60:0x64], "little") & 0x80:  # INCOMPAT_64BIT
        blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
    log = int.from_bytes(sb[0x18:0x1C], "little")
    if log > 6:
        raise FormatError(f"ext superblock block size 2^{10 + log} is not valid", view.name)
    return blocks * (1024 << log)


def ext_block_size(view: BlockDevice) -> int:
    """The block size of the ext2/3/4 filesystem on ``view`` (call after :func:`ext_size`)."""
    return 1024 << int.from_bytes(view.read(1024 + 0x18, 4), "little")


def _find(table: PartitionTable, dev: BlockDevice, root_index: int | None) -> tuple[Partition, Partition]:
    if table.scheme != "gpt":
        raise PolicyError("a Linux template needs a GPT disk with an EFI system partition", dev.name)
    esps = [p for p in table.partitions if p.type_guid == ESP_TYPE]
    if len(esps) != 1:
        raise PolicyError(f"{len(esps)} EFI system partitions (need exactly one: it holds the UKI)", dev.name)
    if root_index is not None:
        root = table.get(root_index)
    else:
        cands = [
            p
            for p in table.partitions
            if p.type_guid in (LINUX_ROOT_X86_64, LINUX_FILESYSTEM) and ext_size(p.view(dev)) is not None
        ]
        if len(cands) != 1:
            raise UsageError(
                f"{len(cands)} Linux ext partitions: cannot tell which is the root",
                dev.name,
                "name the root partition",
                code="linux.root-partition",
            )
        root = cands[0]
    if root.index == esps[0].index:
        raise UsageError("the root partition is the ESP", dev.name)
    return esps[0], root


def protect_linux(
    golden_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    name: str,
    version: str,
    signer: Signer,
    keyslots: Sequence[KeyslotSpec],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    pss: bool = False,
    overwrite: bool = False,
    root_partition: int | None = None,
    subformat: str | None = None,
) -> dict[str, Any]:
    """Make a signed Linux template from ``golden_path`` at ``out_path`` (see the module doc)."""
    from ..disk import create_disk, open_disk, output_subformat, read_partition_table

    t0 = time.perf_counter()
    parse_version(version)
    src_p, out_p = Path(golden_path), Path(out_path)
    if out_p.exists() and src_p.exists() and os.path.samefile(src_p, out_p):
        raise UsageError("the output is the input", str(out_p), "protect writes a new disk")
    if out_p.exists() and not overwrite:
        raise UsageError("output exists", str(out_p), "choose another name, or allow overwriting", code="output.exists")
    if not keyslots:
        raise UsageError("at least one keyslot is needed")
    fmt = "vhdx" if out_p.name.lower().endswith(".vhdx") else "raw"
    src = open_disk(src_p)
    vsc_path = None
    try:
        sub = output_subformat(src, subformat, fmt)
        table = read_partition_table(src)
        esp, root = _find(table, src, root_partition)
        root_view = root.view(src)
        fs = ext_size(root_view)
        if fs is None:
            raise PolicyError(f"partition {root.index} holds no ext filesystem", str(src_p))
        data_size = root.size - DATA_OFFSET
        # dm-crypt exposes the segment's sector size as the device's logical block size, and ext4
        # cannot mount a filesystem whose blocks are smaller than that: 4 KiB sectors only under
        # 4 KiB filesystem blocks (found booting a guest: 1 KiB-block ext4 on 4 KiB sectors is EINVAL)
        ss = 4096 if data_size % 4096 == 0 and ext_block_size(root_view) >= 4096 else 512
        if data_size <= 0 or data_size % ss:
            raise PolicyError(
                f"root partition {root.index} ({root.size} bytes) cannot hold a LUKS2 header",
                str(src_p),
                "make it a multiple of 512 bytes and larger than 16 MiB",
            )
        if fs > data_size:
            raise PolicyError(
                f"the root filesystem ends {fs - data_size} bytes too late: LUKS2 needs the first "
                f"16 MiB of partition {root.index}",
                str(src_p),
                f"shrink it first: resize2fs ROOT {data_size // 1024}K (or build it 16 MiB smaller)",
            )
        key = os.urandom(KEY_SIZE)
        region = build_metadata_region(key, keyslots, sector_size=ss)
        from ..bitlocker.cipher import XtsCipher

        cipher = XtsCipher(key, ss)
        esp_view = esp.view(src)
        with atomic_outputs() as outs:
            tmp_out = outs.add(out_p, 0o644)
            dst = create_disk(tmp_out, src.size, like=src, fmt=fmt, subformat=sub)
            try:
                with progress(src.size, "writing template") as bar:
                    _copy_outside(src, dst, (root.offset, root.size), bar)
                    dst.write(root.offset, region)
                    base = root.offset + DATA_OFFSET
                    encrypt_data(
                        cipher, data_size, root_view.read, lambda o, d: dst.write(base + o, bytes(d)), "encrypting root"
                    )
                    bar.update(root.size)
                m = measure_volume(esp_view, block_size, free_space=FREE_NONE, desc="measuring ESP")
                doc = CatalogDocument.build(
                    name,
                    version,
                    VolumeInfo(
                        size=esp.size,
                        sector_size=src.sector_size,
                        filesystem="esp",
                        partition_index=esp.index,
                        partition_offset=esp.offset,
                        partition_guid=uuid_str(esp.guid),
                        partition_type=uuid_str(esp.type_guid),
                        partition_name=esp.name,
                        disk_guid=uuid_str(table.disk_guid),
                    ),
                    block_size,
                    m.leaves,
                    m.root,
                    FREE_NONE,
                )
                der = _sign_into(dst, fmt, doc, signer, pss)
            finally:
                dst.close()
            if fmt == "raw":
                vsc_path = str(out_p) + ".vsc"
                outs.write(vsc_path, der)
    finally:
        src.close()
    return {
        "output": str(out_p),
        "vsc": vsc_path,
        "name": doc.name,
        "version": doc.version_str,
        "signer": signer.describe(),
        "root": doc.root.hex(),
        "block_size": doc.block_size,
        "block_count": doc.block_count,
        "esp": {"index": esp.index, "offset": esp.offset, "size": esp.size},
        "luks": {
            "partition": root.index,
            "offset": root.offset,
            "data_offset": DATA_OFFSET,
            "data_size": data_size,
            "filesystem_size": fs,
            "sector_size": ss,
            "keyslots": len(keyslots),
            "tokens": sum(1 for k in keyslots if k.token),
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = ["ext_block_size", "ext_size", "protect_linux"]
