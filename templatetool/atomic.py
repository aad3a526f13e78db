"""Atomic outputs: write to a temp file in the destination folder, fsync, rename when complete.

:func:`atomic_output` makes one output; :func:`atomic_outputs` several that appear together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ResourceError, UsageError


@dataclass
class _Critical:
    """The main thread's :func:`no_interrupts` nesting and the interrupt it deferred."""

    depth: int = 0
    pending: BaseException | None = None


_critical = _Critical()


def defer_interrupt(exc: BaseException) -> bool:
    """For a SIGINT handler: inside :func:`no_interrupts`, keep ``exc`` to be raised when the
    block ends and return True; else return False (the handler raises it now).

    Needed besides the signal mask: the kernel delivers a process-wide SIGINT to any thread that
    does not block it, and Python then runs the handler in the main thread regardless of its mask.
    """
    if _critical.depth > 0:
        if _critical.pending is None:
            _critical.pending = exc
        return True
    return False


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """No SIGINT/SIGTERM inside the block (main thread: signal mask, and a handler using
    :func:`defer_interrupt`); a pending interrupt is raised when the outermost block ends."""
    main = threading.current_thread() is threading.main_thread()
    old = (
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if main and hasattr(signal, "pthread_sigmask")
        else None
    )
    if main:
        _critical.depth += 1
    try:
        yield
    finally:
        if main:
            _critical.depth -= 1
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if main and _critical.depth == 0 and _critical.pending is not None:
            exc, _critical.pending = _critical.pending, None
            raise exc


def _new_temp(dest: Path, folder: Path, mode: int) -> Path:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ResourceError(f"cannot create output: {e.strerror}", str(folder)) from e
    os.close(fd)
    os.chmod(tmp, mode)
    return Path(tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int = 0o644, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. ``mode`` is
    applied before any data is written (use 0o600 for key material).
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise UsageError(
            "output exists", str(dest), "choose another name, or allow overwriting it", code="output.exists"
        )
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise ResourceError("output folder does not exist", str(folder), "create it first")
    tmp_path: Path | None = None
    try:
        with no_interrupts():  # a Ctrl-C cannot land between creating the temp file and owning it
            tmp_path = _new_temp(dest, folder, mode)
        yield tmp_path
        try:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, dest)
        except OSError as e:
            raise ResourceError(f"cannot complete the output: {e.strerror}", str(dest)) from None
        _fsync_dir(folder)
    except BaseException:
        if tmp_path is not None:
            with no_interrupts(), contextlib.suppress(OSError):
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


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class OutputSet:
    """Several outputs of one command that appear together or not at all.

    Each output is first written to a temporary file beside its destination (:meth:`add`,
    :meth:`write`, or :meth:`adopt` for a finished temporary file made elsewhere). :meth:`commit`
    fsyncs them and renames them all into place with SIGINT blocked; if a rename fails, the
    outputs already renamed are undone (an overwritten destination gets its old content back).
    :meth:`discard` removes the temporaries. Use it through :func:`atomic_outputs`.
    """

    def __init__(self, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self._items: list[tuple[Path, Path]] = []  # (destination, temporary)

    def _check(self, dest: Path) -> None:
        if any(d == dest for d, _ in self._items):
            raise UsageError("the same output is given twice", str(dest), "give each output its own name")
        if dest.exists() and not self.overwrite:
            raise UsageError(
                "output exists", str(dest), "choose another name, or allow overwriting it", code="output.exists"
            )
        folder = dest.parent if str(dest.parent) else Path(".")
        if not folder.is_dir():
            raise ResourceError("output folder does not exist", str(folder), "create it first")

    def add(self, path: str | os.PathLike[str], mode: int = 0o644) -> Path:
        """A new temporary file (mode ``mode``) for destination ``path``; write it, then commit."""
        dest = Path(path)
        self._check(dest)
        with no_interrupts():  # created and registered (so discarded) as one step
            tmp = _new_temp(dest, dest.parent if str(dest.parent) else Path("."), mode)
            self._items.append((dest, tmp))
        return tmp

    def write(self, path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
        """Stage ``data`` for ``path``."""
        tmp = self.add(path, mode)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            raise ResourceError(f"cannot write: {e.strerror}", str(path)) from None

    def adopt(self, tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
        """Stage the finished file ``tmp`` (same folder as ``path``) as the new ``path``."""
        dest = Path(path)
        self._check(dest)
        self._items.append((dest, Path(tmp)))

    def discard(self) -> None:
        """Remove every temporary file (the destinations are untouched)."""
        with no_interrupts():
            for _dest, tmp in self._items:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._items.clear()

    def commit(self) -> None:
        """fsync every temporary file, then rename them all into place, all or nothing."""
        try:
            for _dest, tmp in self._items:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
        except OSError as e:
            raise ResourceError(f"cannot complete the outputs: {e.strerror}") from None
        blocked = no_interrupts()
        blocked.__enter__()
        done: list[tuple[Path, Path | None]] = []  # (destination, backup of its old content)
        backups: list[Path] = []
        try:
            try:
                for dest, tmp in self._items:
                    backup = None
                    if dest.exists():  # keep the old content until every output is in place
                        backup = dest.with_name(f".{dest.name}.{os.getpid()}.old")
                        with contextlib.suppress(FileNotFoundError):
                            backup.unlink()
                        os.link(dest, backup)
                        backups.append(backup)
                    os.replace(tmp, dest)
                    done.append((dest, backup))
            except OSError as e:
                for dest, backup in reversed(done):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, dest)
                        else:
                            dest.unlink()
                raise ResourceError(
                    f"cannot complete the outputs: {e.strerror}", str(e.filename or ""), "nothing was changed"
                ) from None
            for b in backups:
                with contextlib.suppress(OSError):
                    b.unlink()
            for folder in {d.parent for d, _ in self._items}:
                _fsync_dir(folder if str(folder) else Path("."))
            self._items.clear()
        finally:
            for b in backups:
                with contextlib.suppress(OSError):
                    b.unlink()
            blocked.__exit__(None, None, None)


@contextlib.contextmanager
def atomic_outputs(overwrite: bool = True) -> Iterator[OutputSet]:
    """An :class:`OutputSet` committed when the block ends normally, discarded on any exception
    (including KeyboardInterrupt): the outputs appear together or not at all."""
    outs = OutputSet(overwrite)
    try:
        yield outs
        outs.commit()
    except BaseException:
        outs.discard()
        raise


__all__ = ["OutputSet", "atomic_output", "atomic_outputs", "defer_interrupt", "no_interrupts", "write_bytes_atomic"]
