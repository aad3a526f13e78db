"""Atomic outputs: write to a temp file in the destination folder, fsync, rename when complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ResourceError, UsageError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int = 0o644, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. ``mode`` is
    applied before any data is written (use 0o600 for key material).
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise UsageError("output exists", str(dest), "choose another name or remove it")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise ResourceError("output folder does not exist", str(folder), "create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ResourceError(f"cannot create output: {e.strerror}", str(folder)) from e
    os.close(fd)
    os.chmod(tmp, mode)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, dest)
        except OSError as e:
            raise ResourceError(f"cannot complete the output: {e.strerror}", str(dest)) from None
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode``."""
    with atomic_output(path, mode) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            raise ResourceError(f"cannot write: {e.strerror}", str(path)) from None
