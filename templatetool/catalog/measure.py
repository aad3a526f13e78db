"""Measure a volume for the catalog: fixed-size blocks, SHA-256 leaves, a Merkle root.

Clusters that the NTFS $Bitmap marks free are measured as zeros (other filesystems: every byte),
so encryption that leaves free space alone keeps the catalog valid, and free space never needs
to be read. Hashing runs on a thread pool (hashlib releases the GIL on large buffers), one pass.

Two ways in:

* :func:`measure_volume` drives the pass itself (reads only blocks holding used clusters);
* :class:`Measurer` is a streaming tap: a later pass that writes the volume (e.g. shielding)
  calls ``feed(offset, data)`` in order and ``finish()`` at the end.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..blockdev import BlockDevice
from ..errors import FormatError, ResourceError, UsageError
from ..parallel import PassTaps, SkipFn
from ..progress import progress
from . import DEFAULT_BLOCK_SIZE
from .merkle import leaf_hash, root_from
from .ntfs import FreeMap, ntfs_free_map

#: Free-space modes recorded in the catalog.
FREE_NTFS = "ntfs-bitmap-zero"
FREE_NONE = "none"


def default_workers() -> int:
    """Hashing threads: one per CPU available to us (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Measurement:
    """The result of measuring a volume."""

    volume_size: int
    block_size: int
    root: bytes
    leaves: list[bytes]
    free_space: str = FREE_NONE
    cluster_size: int | None = None
    bytes_read: int = 0
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def block_count(self) -> int:
        return len(self.leaves)

    def to_json(self) -> dict[str, object]:
        return {
            "volume_size": self.volume_size,
            "block_size": self.block_size,
            "block_count": self.block_count,
            "root": self.root.hex(),
            "free_space": self.free_space,
            "cluster_size": self.cluster_size,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }


class Measurer:
    """Streaming measurement tap.

    ``feed(offset, data)`` must be called with consecutive spans starting at 0 (any lengths);
    ``feed_zeros(offset, length)`` stands for a span of zeros without materialising it;
    ``finish()`` returns ``(root, leaves)`` once exactly ``volume_size`` bytes were fed.
    """

    def __init__(
        self,
        volume_size: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        free_map: FreeMap | None = None,
        workers: int | None = None,
    ) -> None:
        if block_size <= 0 or block_size % 512:
            raise UsageError(f"block size {block_size} must be a positive multiple of 512")
        if volume_size <= 0:
            raise FormatError("cannot measure an empty volume")
        if free_map is not None and block_size % free_map.cluster_size:
            raise UsageError(f"block size {block_size} must be a multiple of the cluster size {free_map.cluster_size}")
        self.volume_size = volume_size
        self.block_size = block_size
        self.free_map = free_map
        self.block_count = (volume_size + block_size - 1) // block_size
        self._leaves: list[bytes | None] = [None] * self.block_count
        self._pos = 0
        self._buf = bytearray()
        self._workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="vsc-hash")
        self._inflight: deque[Future[None]] = deque()
        self._zero_leaf: dict[int, bytes] = {}
        self._finished = False

    # -- internals ---------------------------------------------------------------------------
    def _block_len(self, index: int) -> int:
        return min(self.block_size, self.volume_size - index * self.block_size)

    def _zero(self, n: int) -> bytes:
        z = self._zero_leaf.get(n)
        if z is None:
            z = self._zero_leaf[n] = leaf_hash(bytes(n))
        return z

    def _mask(self, index: int, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Zero the free clusters of block ``index`` (returns data unchanged when all are used)."""
        fm = self.free_map
        if fm is None:
            return data
        off = index * self.block_size
        used = fm.used_in(off, len(data))
        if used is None or used.all():
            return data
        cs = fm.cluster_size
        arr = np.frombuffer(data, dtype=np.uint8).copy()
        ncl = used.shape[0]
        covered = min(len(arr), ncl * cs)
        full = covered // cs
        view = arr[: full * cs].reshape(full, cs)
        view[~used[:full]] = 0
        if covered % cs and not used[full]:
            arr[full * cs : covered] = 0
        return arr.data

    def _hash_block(self, index: int, data: bytes | bytearray | memoryview) -> None:
        self._leaves[index] = leaf_hash(self._mask(index, data))

    def _submit(self, index: int, data: bytes | bytearray | memoryview) -> None:
        while len(self._inflight) >= 2 * self._workers + 2:
            self._inflight.popleft().result()
        self._inflight.append(self._pool.submit(self._hash_block, index, data))

    def _block_all_free(self, index: int) -> bool:
        fm = self.free_map
        if fm is None:
            return False
        n = self._block_len(index)
        used = fm.used_in(index * self.block_size, n)
        if used is None:
            return False
        covered = used.shape[0] * fm.cluster_size
        return covered >= n and not used.any()

    # -- public --------------------------------------------------------------------------------
    def block_all_free(self, index: int) -> bool:
        """True when every cluster of block ``index`` is free (it measures as zeros unread)."""
        return self._block_all_free(index)

    def free_blocks(self) -> np.ndarray:
        """:meth:`block_all_free` of every block at once (one bool per block, from the packed
        bitmap without a Python call per block: a 64 GiB volume has 65,536 blocks)."""
        out = np.zeros(self.block_count, dtype=bool)
        fm = self.free_map
        if fm is None:
            return out
        per = self.block_size // fm.cluster_size
        any_used = fm.any_used_per(per, self.block_count)
        if any_used is None:
            return np.array([self._block_all_free(i) for i in range(self.block_count)], dtype=bool)
        out = ~any_used
        # any_used_per counts blocks past the map's whole runs as used; ask those one by one
        for i in range(min(self.block_count, fm.cluster_count // per), self.block_count):
            out[i] = self._block_all_free(i)
        return out

    def feed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Add the next span of volume bytes (``offset`` must follow the previous span)."""
        if self._finished:
            raise UsageError("measurer already finished")
        if offset != self._pos:
            raise UsageError(f"measurer fed out of order: expected offset {self._pos}, got {offset}")
        n = len(data)
        if self._pos + n > self.volume_size:
            raise UsageError("measurer fed past the end of the volume")
        mv = memoryview(data).cast("B")
        bs = self.block_size
        pos = 0
        if self._buf:
            need = bs - len(self._buf)
            take = min(need, n)
            self._buf += mv[:take]
            pos = take
            idx = self._pos // bs
            if len(self._buf) == self._block_len(idx):
                self._submit(idx, bytes(self._buf))
                self._buf = bytearray()
        cur = self._pos + pos
        while pos < n:
            idx = cur // bs
            blen = self._block_len(idx)
            if n - pos >= blen:
                # Immutable bytes can be shared with the hashing thread; anything else is copied
                # because the caller may reuse its buffer.
                self._submit(idx, mv[pos : pos + blen] if isinstance(data, bytes) else bytes(mv[pos : pos + blen]))
                pos += blen
                cur += blen
            else:
                self._buf += mv[pos:]
                cur += n - pos
                pos = n
        self._pos += n

    def feed_shared(self, offset: int, data: memoryview) -> list[Future[None]]:
        """Like ``feed`` for whole blocks, without copying: the caller must keep ``data``
        unchanged until every returned future is done (used with reusable read buffers)."""
        bs = self.block_size
        if offset != self._pos or self._buf or offset % bs:
            raise UsageError("feed_shared needs block-aligned, in-order spans")
        n = len(data)
        if n % bs and offset + n != self.volume_size:
            raise UsageError("feed_shared needs whole blocks (or the volume's last block)")
        futs = []
        for pos in range(0, n, bs):
            idx = (offset + pos) // bs
            futs.append(self._pool.submit(self._hash_block, idx, data[pos : pos + self._block_len(idx)]))
        self._pos += n
        return futs

    def block_digests(self, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Leaf digests (32 bytes each) of the whole blocks in ``data`` at block-aligned ``offset``.

        Pure (no state changes): safe to call in a worker process; hand the result to
        :meth:`accept_digests` in order."""
        bs = self.block_size
        if offset % bs:
            raise UsageError("block_digests needs a block-aligned offset")
        mv = memoryview(data).cast("B")
        out = []
        for pos in range(0, len(mv), bs):
            idx = (offset + pos) // bs
            blen = self._block_len(idx)
            if len(mv) - pos < blen:
                raise UsageError("block_digests needs whole blocks (or the volume's last block)")
            out.append(leaf_hash(self._mask(idx, mv[pos : pos + blen])))
        return b"".join(out)

    def accept_digests(self, offset: int, length: int, digests: bytes) -> None:
        """Record the digests :meth:`block_digests` computed for the span ``offset``+``length``."""
        bs = self.block_size
        if offset != self._pos or self._buf or offset % bs:
            raise UsageError(f"digests out of order: expected offset {self._pos}, got {offset}")
        count = -(-length // bs)
        if len(digests) != 32 * count or offset + length > self.volume_size:
            raise UsageError("digest count does not match the span")
        first = offset // bs
        for i in range(count):
            self._leaves[first + i] = digests[32 * i : 32 * i + 32]
        self._pos += length

    def worker_taps(self, skip: SkipFn | None = None) -> PassTaps:
        """This measurer as the observer of an engine pass (e.g. an encryption): each span is
        hashed in the workers (:meth:`block_digests`), the digests recorded here in order, and
        spans the pass ``skip``s measured as zeros. Needs chunks that are whole blocks."""
        return PassTaps(skip=skip, on_skip=self.feed_zeros, worker_tap=self.block_digests, on_tap=self.accept_digests)

    def feed_zeros(self, offset: int, length: int) -> None:
        """Add ``length`` zero bytes without materialising whole zero blocks."""
        if offset != self._pos:
            raise UsageError(f"measurer fed out of order: expected offset {self._pos}, got {offset}")
        bs = self.block_size
        end = offset + length
        if end > self.volume_size:
            raise UsageError("measurer fed past the end of the volume")
        if not self._buf and offset % bs == 0 and length >= bs:  # whole blocks at once
            count = length // bs
            first = offset // bs
            if first + count == self.block_count and self._block_len(first + count - 1) != bs:
                count -= 1  # the short last block goes through the general path
            z = self._zero(bs)
            self._leaves[first : first + count] = [z] * count
            self._pos += count * bs
        while self._pos < end:
            idx = self._pos // bs
            blen = self._block_len(idx)
            if not self._buf and self._pos % bs == 0 and end - self._pos >= blen:
                self._leaves[idx] = self._zero(blen)
                self._pos += blen
            else:
                k = min(end - self._pos, blen - (self._pos - idx * bs))
                self.feed(self._pos, bytes(k))

    def skip_free_block(self, index: int) -> None:
        """Account for a block whose clusters are all free (measures as zeros, never read)."""
        if index * self.block_size != self._pos or self._buf:
            raise UsageError("skip_free_block out of order")
        blen = self._block_len(index)
        self._leaves[index] = self._zero(blen)
        self._pos += blen

    def finish(self) -> tuple[bytes, list[bytes]]:
        """Wait for the hashing, return ``(root, leaves)``."""
        if self._finished:
            raise UsageError("measurer already finished")
        if self._pos != self.volume_size:
            raise UsageError(f"measurer got {self._pos} of {self.volume_size} bytes")
        try:
            while self._inflight:
                self._inflight.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
            self._finished = True
        leaves = [x for x in self._leaves if x is not None]
        if len(leaves) != self.block_count:  # pragma: no cover - guarded by the checks above
            raise UsageError("measurer is missing blocks")
        return root_from(leaves), leaves

    def close(self) -> None:
        """Abandon the measurement (stop the threads)."""
        if not self._finished:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._finished = True


def _raw_fd(view: BlockDevice) -> tuple[int, int] | None:
    """(fd, byte offset) when ``view`` is a RawFile or a View chain over one (fast path)."""
    from ..blockdev import RawFile, View

    off = 0
    dev = view
    while isinstance(dev, View):
        off += dev.offset
        dev = dev.base
    if isinstance(dev, RawFile) and type(dev) is RawFile:
        return dev.fileno(), off
    return None


def _pread_into(raw: tuple[int, int], offset: int, mv: memoryview, name: str) -> None:
    fd, base = raw
    done = 0
    while done < len(mv):
        try:
            got = os.preadv(fd, [mv[done:]], base + offset + done)
        except OSError as e:
            raise ResourceError(f"read failed: {e.strerror}", name) from None
        if got == 0:  # past the end of a shorter file: zeros (as RawFile.read does)
            mv[done:] = bytes(len(mv) - done)
            break
        done += got


def free_map_for(view: BlockDevice, filesystem: str | None = None) -> tuple[FreeMap | None, str]:
    """The free map and free-space mode for a volume: NTFS → its $Bitmap; otherwise none."""
    if filesystem is None:
        from ..disk import sniff_filesystem

        filesystem = sniff_filesystem(view)
    if filesystem == "ntfs":
        return ntfs_free_map(view), FREE_NTFS
    return None, FREE_NONE


def measure_volume(
    view: BlockDevice,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    free_space: str | None = None,
    free_map: FreeMap | None = None,
    workers: int | None = None,
    read_size: int = 8 << 20,
    desc: str = "measuring",
) -> Measurement:
    """Measure ``view`` in one pass (only blocks with used clusters are read).

    ``free_space``: None = by filesystem (NTFS → $Bitmap), ``'none'`` = every byte,
    ``'ntfs-bitmap-zero'`` = require NTFS. ``free_map`` overrides the map read from the volume.
    """
    t0 = time.perf_counter()
    if free_map is None:
        if free_space == FREE_NONE:
            mode = FREE_NONE
        elif free_space in (None, FREE_NTFS):
            free_map, mode = free_map_for(view, None)
            if free_space == FREE_NTFS and free_map is None:
                raise FormatError("the volume is not NTFS but the catalog measures NTFS free space", view.name)
        else:
            raise UsageError(f"unknown free-space mode {free_space!r}")
    else:
        mode = FREE_NTFS
    if block_size % 512 or (free_map is not None and block_size % free_map.cluster_size):
        raise UsageError(f"block size {block_size} must be a multiple of the cluster size")
    m = Measurer(view.size, block_size, free_map, workers)
    per_read = max(1, read_size // block_size)
    read = 0
    raw = _raw_fd(view)
    # Reusable read buffers (fresh multi-MiB allocations cost page faults); a buffer is reused
    # only after the hashing of every block in it has finished.
    nbuf = 2 * m._workers + 1
    bufs = [bytearray(per_read * block_size) for _ in range(nbuf)] if raw else []
    pending: list[list[Future[None]]] = [[] for _ in range(nbuf)]
    turn = 0
    try:
        free = m.free_blocks()
        # runs of equal flags: [bounds[k], bounds[k + 1]) are all free or all not free
        bounds = [0, *(np.flatnonzero(free[1:] != free[:-1]) + 1).tolist(), m.block_count]
        with progress(view.size, desc) as bar:
            for a, b in itertools.pairwise(bounds):
                if free[a]:  # measured as zeros, never read
                    off = a * block_size
                    n = min(view.size, b * block_size) - off
                    m.feed_zeros(off, n)
                    bar.update(n)
                    continue
                for idx in range(a, b, per_read):  # read blocks that are not entirely free
                    j = min(b, idx + per_read)
                    off = idx * block_size
                    n = min(view.size, j * block_size) - off
                    if raw:
                        k = turn % nbuf
                        turn += 1
                        for f in pending[k]:
                            f.result()
                        mv = memoryview(bufs[k])[:n]
                        _pread_into(raw, off, mv, view.name)
                        pending[k] = m.feed_shared(off, mv)
                    else:
                        m.feed(off, view.read(off, n))
                    read += n
                    bar.update(n)
        root, leaves = m.finish()
    except BaseException:
        m.close()
        raise
    return Measurement(
        view.size,
        block_size,
        root,
        leaves,
        mode,
        free_map.cluster_size if free_map else None,
        read,
        time.perf_counter() - t0,
    )
