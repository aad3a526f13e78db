"""The parallel engine: ordered chunk processing on forked worker processes, and forked jobs.

The disk passes (encrypt, decrypt, measure) are CPU-bound in SHA-256 and the numpy part of the
batched XTS, and numpy holds the GIL between its calls: threads scale poorly (see
docs/performance.md). An :class:`Engine` (workers, chunk size, queue depth, direct I/O) is built
by the caller (the CLI from ``TEMPLATETOOL_*`` variables with :meth:`Engine.from_env`, a library
user with its own numbers) and passed down; nothing below reads tuning from the environment.

:meth:`Engine.map` runs a per-chunk function in ``workers`` forked processes. Each worker writes
its chunk result into a slot of one anonymous shared ``mmap`` (no pickling of data) and returns a
small payload (e.g. the chunk's leaf digests) over a pipe; the parent gets the results back *in
submission order*, so it alone writes the output file and feeds order-dependent consumers.
:meth:`Engine.spawn` computes one fixed-size result in a forked child (the BitLocker key
stretches overlap the disk pass this way).

Every fork goes through :func:`_fork`, and only while this is the process's only Python thread:
with another thread alive (Python 3.12 warns that a fork may then deadlock) the engine runs the
same work inline instead. Progress bars start no monitor thread (templatetool.progress).
Workers are plain ``os.fork`` children: they inherit the open devices and keys (nothing secret
crosses a pipe or touches a file), die with the parent (``PR_SET_PDEATHSIG``), ignore SIGINT
(the parent handles it), tune glibc's allocator for themselves only, and are killed and reaped
when the iteration ends for any reason. Where ``fork`` is unavailable, or ``workers <= 1``, the
same function runs inline.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import signal
import struct
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from .blockdev import CHUNK
from .errors import ResourceError, UsageError

#: ``fn(offset, length, out) -> payload``: fill ``out`` (the whole slot: at least ``slot`` + 64
#: bytes) and return a small ``bytes`` payload.
ChunkFn = Callable[[int, int, memoryview], bytes]

#: One item of :meth:`Engine.map`'s output: ``(offset, length, out, payload)``; ``out`` and
#: ``payload`` are None for a pass-through (skipped) item.
MapItem = tuple[int, int, memoryview | None, bytes | None]

_TASK = struct.Struct("<qqq")  # offset, length (-1: exit), slot
_RESULT = struct.Struct("<BI")  # status (0 ok, 1 error), payload length
_ROOM = 64  # scratch bytes after each slot (update_into wants a block of room)
_MAX_WORKERS = 4

#: Environment variables :meth:`Engine.from_env` reads (the CLI's business, never the library's).
ENV_WORKERS = "TEMPLATETOOL_WORKERS"
ENV_DIRECT_IO = "TEMPLATETOOL_DIRECT_IO"
ENV_INPLACE_STEP = "TEMPLATETOOL_INPLACE_CHUNK"


# -- typed callbacks of a disk pass (the engine owns them; bitlocker and catalog only meet here) --
class SkipFn(Protocol):
    """``skip(offset, length) -> bool``: the span need not be read or written."""

    def __call__(self, offset: int, length: int, /) -> bool: ...


class ChunkMaskSkip(SkipFn, Protocol):
    """A :class:`SkipFn` that also answers for every chunk at once (one bool per chunk)."""

    def chunk_mask(self, chunk: int, /) -> object: ...


class SpanFn(Protocol):
    """``on_skip(offset, length)``: a span was skipped (called in volume order)."""

    def __call__(self, offset: int, length: int, /) -> None: ...


class DataTap(Protocol):
    """``tap(offset, data)``: sees each processed plaintext span in this process, in order."""

    def __call__(self, offset: int, data: bytes | memoryview, /) -> None: ...


class WorkerTap(Protocol):
    """``worker_tap(offset, data) -> bytes``: runs in the worker on each span read (pure)."""

    def __call__(self, offset: int, data: memoryview, /) -> bytes: ...


class PayloadSink(Protocol):
    """``on_tap(offset, length, payload)``: a :class:`WorkerTap` result, here and in order."""

    def __call__(self, offset: int, length: int, payload: bytes, /) -> None: ...


@dataclass(frozen=True)
class PassTaps:
    """Observers of one disk pass (all optional): what the pass may skip and who sees what it read.

    ``skip``/``on_skip``: skippable spans and their notification; ``worker_tap``/``on_tap``: a
    pure per-span function run in the workers and its results delivered here in order; ``tap``:
    every plaintext span in this process (costs a copy).
    """

    skip: SkipFn | None = None
    on_skip: SpanFn | None = None
    tap: DataTap | None = None
    worker_tap: WorkerTap | None = None
    on_tap: PayloadSink | None = None


def usable_cpus() -> int:
    """CPUs this process may run on (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _default_workers() -> int:
    return min(_MAX_WORKERS, usable_cpus())


@dataclass(frozen=True)
class Engine:
    """How disk passes run: ``workers`` forked processes (1: inline), ``chunk`` bytes per item,
    ``depth`` chunks in flight per worker, ``direct_io`` for raw outputs that support it, and
    ``step``: the in-place conversion step in bytes (None: the converter's default).

    Build one per job (or per program) and pass it down; :meth:`from_env` is for the CLI.
    """

    workers: int = field(default_factory=_default_workers)
    chunk: int = CHUNK
    depth: int = 3
    direct_io: bool = True
    step: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.depth < 1 or self.chunk <= 0 or self.chunk % 4096:
            raise UsageError(
                f"bad engine settings: workers={self.workers}, depth={self.depth}, chunk={self.chunk}",
                hint="workers and depth at least 1, chunk a positive multiple of 4096",
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Engine:
        """An engine from ``TEMPLATETOOL_WORKERS`` (count), ``TEMPLATETOOL_DIRECT_IO`` (0: off)
        and ``TEMPLATETOOL_INPLACE_CHUNK`` (in-place step, bytes)."""
        env = os.environ if env is None else env
        raw = (env.get(ENV_WORKERS) or "").strip()
        workers = int(raw) if raw.isdigit() and int(raw) > 0 else _default_workers()
        raw_step = (env.get(ENV_INPLACE_STEP) or "").strip()
        step = None
        if raw_step:
            try:
                step = int(raw_step)
            except ValueError:
                raise UsageError(f"{ENV_INPLACE_STEP}={raw_step!r} is not a number of bytes") from None
        return cls(workers=workers, direct_io=env.get(ENV_DIRECT_IO, "1") != "0", step=step)

    def with_workers(self, workers: int | None) -> Engine:
        """This engine with another worker count (None: unchanged)."""
        return self if workers is None else replace(self, workers=max(1, workers))

    def can_fork(self) -> bool:
        """True when a fork is safe now: fork exists and no other Python thread is alive."""
        return hasattr(os, "fork") and threading.active_count() == 1

    def items(
        self, size: int, skip: SkipFn | None = None, keep: Collection[int] = ()
    ) -> Iterator[tuple[int, int, bool]]:
        """:func:`chunk_items` in this engine's chunk size."""
        return chunk_items(size, self.chunk, skip, keep)

    def map(
        self, fn: ChunkFn, items: Iterable[tuple[int, int, bool]], slot: int | None = None, depth: int | None = None
    ) -> Iterator[MapItem]:
        """Run ``fn`` over ``items`` and yield ``(offset, length, out, payload)`` in item order.

        ``items`` are ``(offset, length, work)`` with ``length <= slot`` (default: the chunk);
        items with ``work`` false are passed through in order as ``(offset, length, None, None)``
        without running ``fn``. ``out`` is the whole slot ``fn`` wrote into (at least ``slot`` +
        64 bytes) and is valid only until the next item is requested (copy what you keep). At
        most ``workers * depth`` chunks are in flight: memory is bounded by that many slots.
        Exceptions raised by ``fn`` are re-raised in the caller (as the same class).
        """
        return _map(fn, items, self, self.chunk if slot is None else slot, self.depth if depth is None else depth)

    def spawn(self, fn: Callable[[], bytes], size: int) -> Job:
        """Compute ``fn()`` (exactly ``size`` bytes) in a forked child, or now when forking is
        not possible; ``result()`` waits for it. The child gets its inputs by fork only."""
        if not self.can_fork():
            return Job.done(fn())
        return Job.fork(fn, size)


_default: Engine | None = None


def default_engine() -> Engine:
    """The engine used when a caller passes none: the one :func:`set_default_engine` installed
    (the CLI installs ``Engine.from_env()`` once at start), else ``Engine()`` (CPU defaults)."""
    return _default if _default is not None else Engine()


def set_default_engine(engine: Engine | None) -> None:
    """Install the engine used when callers pass none (None: back to ``Engine()``)."""
    global _default
    _default = engine


def engine_for(workers: int | None, engine: Engine | None = None) -> Engine:
    """``engine`` (or the default one) with ``workers`` when given: for APIs taking a count."""
    return (engine or default_engine()).with_workers(workers)


class Job:
    """One result computed by :meth:`Engine.spawn`; ``result()`` waits, ``close()`` abandons."""

    def __init__(self, pid: int, fd: int, size: int, value: bytes | None) -> None:
        self._pid, self._r, self._size, self._value = pid, fd, size, value

    @classmethod
    def done(cls, value: bytes) -> Job:
        """A job whose value is already known."""
        return cls(0, -1, len(value), value)

    @classmethod
    def fork(cls, fn: Callable[[], bytes], size: int) -> Job:
        """Fork a child computing ``fn()``; it sends the bytes back over a pipe and exits."""
        r, w = os.pipe()
        parent = os.getpid()
        pid = _fork()
        if pid == 0:  # pragma: no cover - child: compute, send, exit without parent cleanup
            code = 1
            try:
                os.close(r)
                die_with_parent(parent)
                _write_all(w, fn())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        return cls(pid, r, size, None)

    def result(self) -> bytes:
        """The value (waits for the child); ResourceError when the child failed."""
        if self._value is None:
            data = b""
            if self._r >= 0:
                try:
                    data = _read_exact(self._r, self._size)
                except EOFError:
                    data = b""
            if len(data) == self._size:
                self._value = data
            self.close()
            if self._value is None:
                raise ResourceError("a helper process of the parallel engine failed")
        return self._value

    def close(self) -> None:
        """Kill (when unfinished) and reap the child."""
        if self._r >= 0:
            os.close(self._r)
            self._r = -1
        if self._pid:
            try:
                if self._value is None:
                    os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._pid = 0


def _fork() -> int:
    """The engine's only ``os.fork`` (tests hook it to check no other thread is alive)."""
    return os.fork()


def tune_allocator() -> None:
    """Keep large buffers on the heap (glibc): no mmap/munmap and page faults per 1 MiB chunk.

    Called in worker processes only (a library must not change its host's allocator). glibc
    serves allocations above its (dynamic) mmap threshold with fresh mappings whose pages fault
    in one by one; on this class of VM that doubled the cost of the XTS pass. A fixed 32 MiB
    threshold and a high trim threshold make the per-chunk buffers reuse heap memory instead;
    peak memory stays bounded (the same few chunk-sized blocks are recycled).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


def default_workers() -> int:
    """Worker processes of a default :class:`Engine`: the usable CPUs, at most 4."""
    return _default_workers()


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            raise EOFError
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv) :]


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this (forked) process when its parent dies (``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _worker(fn: ChunkFn, shm: mmap.mmap, stride: int, task_fd: int, result_fd: int) -> None:
    buf = memoryview(shm)
    while True:
        off, n, slot = _TASK.unpack(_read_exact(task_fd, _TASK.size))
        if n < 0:
            return
        try:
            payload = fn(off, n, buf[slot * stride : (slot + 1) * stride])
            msg = _RESULT.pack(0, len(payload)) + payload
        except BaseException as e:
            try:
                blob = pickle.dumps(e)
            except Exception:
                blob = pickle.dumps(RuntimeError(f"worker failed: {type(e).__name__}: {e}"))
            msg = _RESULT.pack(1, len(blob)) + blob
        _write_all(result_fd, msg)


class _Pool:
    def __init__(self, fn: ChunkFn, workers: int, slot: int, depth: int) -> None:
        self.stride = (slot + _ROOM + 4095) // 4096 * 4096
        self.nslots = workers * depth
        self.shm = mmap.mmap(-1, self.stride * self.nslots)
        self.view = memoryview(self.shm)
        self.pids: list[int] = []
        self.task_w: list[int] = []
        self.result_r: list[int] = []
        parent = os.getpid()
        try:
            for _ in range(workers):
                tr, tw = os.pipe()
                rr, rw = os.pipe()
                pid = _fork()
                if pid == 0:  # pragma: no cover - runs in the child (coverage cannot see it)
                    code = 0
                    try:
                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                        die_with_parent(parent)
                        os.close(tw)
                        os.close(rr)
                        for fd in self.task_w + self.result_r:
                            os.close(fd)
                        tune_allocator()
                        _worker(fn, self.shm, self.stride, tr, rw)
                    except BaseException:
                        code = 1
                    finally:
                        os._exit(code)
                os.close(tr)
                os.close(rw)
                self.pids.append(pid)
                self.task_w.append(tw)
                self.result_r.append(rr)
        except BaseException:
            self.close()
            raise

    def slot(self, i: int) -> memoryview:
        return self.view[i * self.stride : (i + 1) * self.stride]

    def send(self, w: int, off: int, n: int, slot: int) -> None:
        try:
            _write_all(self.task_w[w], _TASK.pack(off, n, slot))
        except OSError:  # EPIPE: the worker is gone
            raise ResourceError(
                "a worker process died (killed or out of memory)", hint="re-run; if it persists, use one worker"
            ) from None

    def receive(self, w: int) -> bytes:
        try:
            status, ln = _RESULT.unpack(_read_exact(self.result_r[w], _RESULT.size))
            payload = _read_exact(self.result_r[w], ln)
        except EOFError:
            raise ResourceError(
                "a worker process died (killed or out of memory)", hint="re-run; if it persists, use one worker"
            ) from None
        if status:
            try:
                err = pickle.loads(payload)
            except Exception:
                err = RuntimeError("a worker process failed")
            raise err
        return payload

    def close(self) -> None:
        for fd in self.task_w:
            with contextlib.suppress(OSError):
                _write_all(fd, _TASK.pack(0, -1, 0))
            os.close(fd)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for fd in self.result_r:
            os.close(fd)
        self.task_w, self.result_r, self.pids = [], [], []
        try:
            self.view.release()
            self.shm.close()
        except BufferError:  # a caller still holds a slot view: the mapping goes with it
            pass


def chunk_items(
    size: int, chunk: int, skip: SkipFn | None = None, keep: Collection[int] = ()
) -> Iterator[tuple[int, int, bool]]:
    """Items for :func:`ordered_map` covering ``[0, size)`` in ``chunk`` steps.

    Chunks ``skip(offset, length)`` declares skippable become pass-through items (``work``
    false), one item per *run* of them when
    ``skip`` offers a vectorised ``skip.chunk_mask(chunk)`` (so a 127 GiB mostly-empty volume
    costs a few items, not 130,000); chunk indices in ``keep`` are never skipped.
    """
    import numpy as np

    nchunks = -(-size // chunk)
    mask_fn = getattr(skip, "chunk_mask", None)
    skippable = mask_fn(chunk) if mask_fn is not None else None
    work_at = None
    if skippable is not None:
        skippable = np.asarray(skippable[:nchunks], dtype=bool).copy()
        if skippable.size < nchunks:
            skippable = np.concatenate((skippable, np.zeros(nchunks - skippable.size, dtype=bool)))
        skippable[[i for i in keep if 0 <= i < nchunks]] = False
        work_at = np.flatnonzero(~skippable)
    i = 0
    while i < nchunks:
        off = i * chunk
        n = min(chunk, size - off)
        if skippable is not None and work_at is not None:
            if skippable[i]:
                k = int(np.searchsorted(work_at, i))
                j = int(work_at[k]) if k < len(work_at) else nchunks
                yield off, min(size, j * chunk) - off, False
                i = j
                continue
        elif skip is not None and i not in keep and skip(off, n):
            yield off, n, False
            i += 1
            continue
        yield off, n, True
        i += 1


def ordered_map(
    fn: ChunkFn, items: Iterable[tuple[int, int, bool]], workers: int | None = None, slot: int = CHUNK, depth: int = 3
) -> Iterator[MapItem]:
    """:meth:`Engine.map` on the default engine with ``workers`` (kept for existing callers)."""
    return engine_for(workers).map(fn, items, slot=slot, depth=depth)


def _map(
    fn: ChunkFn, items: Iterable[tuple[int, int, bool]], engine: Engine, slot: int, depth: int
) -> Iterator[MapItem]:
    n_workers = engine.workers if engine.can_fork() else 1  # decided when the pass starts
    if n_workers <= 1:
        buf = memoryview(mmap.mmap(-1, slot + _ROOM))  # page-aligned like the shared slots (O_DIRECT)
        for off, n, work in items:
            if not work:
                yield off, n, None, None
                continue
            if n > slot:
                raise ValueError(f"chunk of {n} bytes exceeds the slot size {slot}")
            yield off, n, buf, fn(off, n, buf)
        return
    pool = _Pool(fn, n_workers, slot, depth)
    try:
        free = deque(range(pool.nslots))
        pending: deque[tuple[int, int, int, int]] = deque()  # off, n, slot (-1: pass), worker
        rr = 0

        def pop() -> tuple[int, int, memoryview | None, bytes | None, int]:
            off, n, s, w = pending.popleft()
            if s < 0:
                return off, n, None, None, -1
            return off, n, pool.slot(s), pool.receive(w), s

        for off, n, work in items:
            if not work:
                if not pending:
                    yield off, n, None, None
                else:
                    pending.append((off, n, -1, -1))
                continue
            if n > slot:
                raise ValueError(f"chunk of {n} bytes exceeds the slot size {slot}")
            while not free:
                o, k, out, payload, s = pop()
                yield o, k, out, payload
                if s >= 0:
                    free.append(s)
            s = free.popleft()
            pool.send(rr, off, n, s)
            pending.append((off, n, s, rr))
            rr = (rr + 1) % n_workers
        while pending:
            o, k, out, payload, s = pop()
            yield o, k, out, payload
            if s >= 0:
                free.append(s)
    finally:
        pool.close()


__all__ = [
    "ChunkMaskSkip",
    "DataTap",
    "Engine",
    "PassTaps",
    "PayloadSink",
    "SkipFn",
    "SpanFn",
    "WorkerTap",
    "chunk_items",
    "default_engine",
    "default_workers",
    "engine_for",
    "ordered_map",
    "set_default_engine",
    "usable_cpus",
]
