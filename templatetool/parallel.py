"""Ordered chunk processing on forked worker processes with shared-memory output slots.

The disk passes (encrypt, decrypt, measure) are CPU-bound in SHA-256 and the numpy part of the
batched XTS, and numpy holds the GIL between its calls: threads scale poorly (see
docs/performance.md). :func:`ordered_map` runs a per-chunk function in ``workers`` forked
processes instead. Each worker writes its chunk result into a slot of one anonymous shared
``mmap`` (no pickling of data) and returns a small payload (e.g. the chunk's leaf digests) over a
pipe; the parent gets the results back *in submission order*, so it alone writes the output
file and feeds order-dependent consumers.

Workers are plain ``os.fork`` children: they inherit the open devices and keys (nothing secret
crosses a pipe or touches a file), die with the parent (``PR_SET_PDEATHSIG``), ignore SIGINT
(the parent handles it) and are killed and reaped when the iteration ends for any reason.
Where ``fork`` is unavailable, or ``workers <= 1``, the same function runs inline.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator

from .blockdev import CHUNK
from .errors import ResourceError

#: ``fn(offset, length, out) -> payload``: fill ``out`` (the whole slot: at least ``slot`` + 64
#: bytes) and return a small ``bytes`` payload.
ChunkFn = Callable[[int, int, memoryview], bytes]

_TASK = struct.Struct("<qqq")  # offset, length (-1: exit), slot
_RESULT = struct.Struct("<BI")  # status (0 ok, 1 error), payload length
_ROOM = 64  # scratch bytes after each slot (update_into wants a block of room)

_tuned = False


def tune_allocator() -> None:
    """Keep large buffers on the heap (glibc): no mmap/munmap and page faults per 1 MiB chunk.

    glibc serves allocations above its (dynamic) mmap threshold with fresh mappings whose pages
    fault in one by one; on this class of VM that doubled the cost of the XTS pass. A fixed 32 MiB
    threshold and a high trim threshold make the per-chunk buffers reuse heap memory instead;
    peak memory stays bounded (the same few chunk-sized blocks are recycled).
    """
    global _tuned
    if _tuned:
        return
    _tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD
    mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


def default_workers() -> int:
    """Worker processes for disk passes: the usable CPUs, at most 4 (``TEMPLATETOOL_WORKERS``)."""
    env = os.environ.get("TEMPLATETOOL_WORKERS")
    if env and env.strip().isdigit():
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


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
        mv = mv[os.write(fd, mv):]


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
            payload = fn(off, n, buf[slot * stride: (slot + 1) * stride])
            msg = _RESULT.pack(0, len(payload)) + payload
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            try:
                blob = pickle.dumps(e)
            except Exception:  # noqa: BLE001
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
                pid = os.fork()
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
                    except BaseException:  # noqa: BLE001
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
        return self.view[i * self.stride: (i + 1) * self.stride]

    def send(self, w: int, off: int, n: int, slot: int) -> None:
        try:
            _write_all(self.task_w[w], _TASK.pack(off, n, slot))
        except OSError:  # EPIPE: the worker is gone
            raise ResourceError("a worker process died (killed or out of memory)",
                                hint="re-run; if it persists, set TEMPLATETOOL_WORKERS=1") from None

    def receive(self, w: int) -> bytes:
        try:
            status, ln = _RESULT.unpack(_read_exact(self.result_r[w], _RESULT.size))
            payload = _read_exact(self.result_r[w], ln)
        except EOFError:
            raise ResourceError("a worker process died (killed or out of memory)",
                                hint="re-run; if it persists, set TEMPLATETOOL_WORKERS=1") from None
        if status:
            try:
                err = pickle.loads(payload)
            except Exception:  # noqa: BLE001
                err = RuntimeError("a worker process failed")
            raise err
        return payload

    def close(self) -> None:
        for fd in self.task_w:
            try:
                _write_all(fd, _TASK.pack(0, -1, 0))
            except OSError:
                pass
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


def chunk_items(size: int, chunk: int, skip: Callable[[int, int], bool] | None = None,
                keep: Collection[int] = ()) -> Iterator[tuple[int, int, bool]]:
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


def ordered_map(fn: ChunkFn, items: Iterable[tuple[int, int, bool]], workers: int | None = None,
                slot: int = CHUNK, depth: int = 3) -> Iterator[tuple[int, int, memoryview | None, bytes | None]]:
    """Run ``fn`` over ``items`` and yield ``(offset, length, out, payload)`` in item order.

    ``items`` are ``(offset, length, work)`` with ``length <= slot``; items with ``work`` false are
    passed through in order as ``(offset, length, None, None)`` without running ``fn``. ``out`` is
    the whole slot ``fn`` wrote into (at least ``slot`` + 64 bytes) and is valid only until the
    next item is requested (copy what you keep). At most ``workers * depth`` chunks are in flight:
    memory is bounded by that many slots.
    Exceptions raised by ``fn`` are re-raised in the caller (as the same class).
    """
    n_workers = default_workers() if workers is None else workers
    if n_workers <= 1 or not hasattr(os, "fork"):
        tune_allocator()
        buf = memoryview(bytearray(slot + _ROOM))
        for off, n, work in items:
            if not work:
                yield off, n, None, None
                continue
            if n > slot:
                raise ValueError(f"chunk of {n} bytes exceeds the slot size {slot}")
            payload = fn(off, n, buf)
            yield off, n, buf, payload
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
