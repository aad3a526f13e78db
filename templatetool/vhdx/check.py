"""Structural validation of a VHDX file and a full-content cross-check against libvhdi (pyvhdi)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..blockdev import require_disk_bytes
from ..errors import NotFoundError, ResourceError, TemplateToolError, UsageError
from ..progress import NullBar as _NullBar
from ..progress import progress as progress_bar
from .disk import PathLike, VhdxDisk, open_vhdx
from .layout import Finding, Reporter, Stop, parse_layout

_CMP_CHUNK = 4 << 20


def check(path: PathLike, parent_search: Sequence[PathLike] | None = None) -> list[Finding]:
    """Validate headers, region tables, metadata, BAT, log and the parent chain.

    Returns findings (severity "error" means the file is corrupt or unusable; "warning" means
    it deviates from what Windows writes but reads fine). Raises NotFoundError when ``path``
    does not exist.
    """
    name = str(path)
    if not os.path.exists(path):
        raise NotFoundError("no such VHDX file", name)
    if os.path.isdir(path):
        raise UsageError("expected a VHDX file, got a folder", name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ResourceError(f"cannot open: {e.strerror}", name) from e
    try:
        require_disk_bytes(os.lseek(fd, 0, os.SEEK_END), name)  # empty/sub-sector: malformed, exit 3
    except BaseException:
        os.close(fd)
        raise
    rep = Reporter(name, collect=True)
    try:
        parse_layout(fd, rep)
    except Stop:
        pass
    except OSError as e:
        raise ResourceError(f"read failed: {e.strerror}", name) from e
    finally:
        os.close(fd)
    if not rep.has_errors:
        # the parent chain (and anything only the full open sees)
        try:
            open_vhdx(path, parent_search=parent_search).close()
        except TemplateToolError as e:
            rep.findings.append(Finding.from_error(e))
    return rep.findings


def _pyvhdi_chain(disk: VhdxDisk) -> list[Any]:
    import pyvhdi

    files = []
    paths = [disk.path, *disk.parent_chain()]
    try:
        for p in paths:
            f = pyvhdi.file()
            f.open(str(p))
            files.append(f)
        for i in range(len(files) - 2, -1, -1):
            files[i].set_parent(files[i + 1])
    except Exception:
        for f in files:
            f.close()
        raise
    return files


def cross_check(
    path: PathLike, parent_search: Sequence[PathLike] | None = None, progress: bool = True
) -> list[Finding]:
    """Compare every byte we read with what libvhdi (pyvhdi) reads; returns findings."""
    findings: list[Finding] = []
    try:
        import pyvhdi  # noqa: F401 -- optional extra: probe before opening anything
    except ImportError:
        raise ResourceError(
            "the cross-check needs the libvhdi-python module (pyvhdi), an optional extra",
            hint="pip install 'templatetool[vhdi]'",
        ) from None
    with open_vhdx(path, parent_search=parent_search) as disk:
        try:
            files = _pyvhdi_chain(disk)
        except Exception as e:
            return [Finding("error", "integrity", f"libvhdi cannot open the file: {e}", str(path))]
        try:
            top = files[0]
            their = top.get_media_size()
            if their != disk.size:
                return [
                    Finding("error", "integrity", f"virtual size differs: ours {disk.size}, libvhdi {their}", str(path))
                ]
            pos = 0
            with progress_bar(disk.size, "cross-check") if progress else _NullBar() as bar:
                while pos < disk.size:
                    n = min(_CMP_CHUNK, disk.size - pos)
                    a = disk.read(pos, n)
                    try:
                        b = top.read_buffer_at_offset(n, pos)
                    except Exception as e:
                        return [Finding("error", "integrity", f"libvhdi read failed at {pos}: {e}", str(path))]
                    if a != b:
                        k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), 0)
                        findings.append(
                            Finding(
                                "error",
                                "integrity",
                                f"content differs from libvhdi at virtual offset {pos + k}",
                                str(path),
                            )
                        )
                        break
                    bar.update(n)
                    pos += n
        finally:
            for f in files:
                f.close()
    return findings
