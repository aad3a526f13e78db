"""Disk-level BitLocker encryption and decryption (raw images or VHDX, GPT/MBR or bare volumes).

``encrypt_disk`` copies the source disk to a new output with one NTFS volume BitLocker-encrypted
in one pass over the source. Unless the volume is already reserved, the four BitLocker regions
are reserved in a sparse metadata overlay (:mod:`templatetool.disk.overlay`: a temporary file
beside the output holding only the volume's NTFS metadata, modified by ntfscp); the pass then
reads the overlay where it has data and the source elsewhere, so file data is read once and
never staged. Other partitions are copied as they are (zero runs skipped).
The output appears atomically; the input is opened read-only and never modified.
``decrypt_disk`` writes a copy with the BitLocker volume replaced by its plaintext.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output
from ..bitlocker.reserve import find_reserved, reserve_ntfs
from ..bitlocker.volume import (
    EncryptResult,
    ProtectorSpec,
    decrypt_volume,
    encrypt_volume,
    open_fve,
)
from ..blockdev import CHUNK, BlockDevice, View, is_zero
from ..disk import create_disk, locate_volume, open_disk, sniff_filesystem
from ..disk.overlay import MetadataOverlay
from ..errors import CredentialError, ResourceError, UnsupportedError, UsageError
from ..parallel import PassTaps, engine_for
from ..progress import progress


@dataclass
class Credentials:
    """One way to unlock a BitLocker volume (exactly one of the credential fields set).

    ``tpm``: the TCTI of a (v)TPM that unseals the volume's vTPM protector (``tpm_pin`` is its
    PIN, for a TPM+PIN protector); ``vmk``: the 32-byte VMK itself.
    """

    recovery_password: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    bek: bytes | None = field(default=None, repr=False)
    clear: bool = False
    vmk: bytes | None = field(default=None, repr=False)
    tpm: str | None = None
    tpm_pin: str | None = field(default=None, repr=False)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`FveVolume.unlock` (a TPM credential is resolved first by
        :func:`unlock_with`)."""
        return {
            "recovery_password": self.recovery_password,
            "password": self.password,
            "bek": self.bek,
            "vmk": self.vmk,
            "clear": self.clear,
        }


def tpm_vmk(fve: Any, tcti: str, *, pin: str | None = None, parent_handle: int | None = None) -> bytes:
    """The VMK of a BitLocker volume, unsealed from its vTPM protector(s) through the (v)TPM at
    ``tcti``. The TPM enforces the PCR policy (PolicyError, exit 6) and the PIN (CredentialError,
    counted by the TPM's dictionary-attack protection)."""
    from ..bitlocker.keys import parse_key_entry
    from ..tpm.protector import unseal_first_with_tpm

    payloads = fve.tpm_blobs()
    if not payloads:
        raise CredentialError("the volume has no TPM protector", fve.name, "unlock it with another credential")
    entry = unseal_first_with_tpm(payloads, tcti, pin=pin, parent_handle=parent_handle)
    _, vmk = parse_key_entry(entry, "VMK unsealed by the TPM", expect_len=32)
    return vmk


def unlock_with(fve: Any, credentials: Credentials) -> Any:
    """Unlock ``fve`` with ``credentials`` (through the TPM for a ``tpm`` credential); return the
    decrypted view."""
    if credentials.tpm:
        return fve.unlock(vmk=tpm_vmk(fve, credentials.tpm, pin=credentials.tpm_pin))
    return fve.unlock(**credentials.kwargs())


def _out_format(path: str | os.PathLike[str]) -> str:
    return "vhdx" if str(path).lower().endswith((".vhdx", ".avhdx")) else "raw"


def _pick(dev: BlockDevice, partition: int | None, want: tuple[str, ...]) -> tuple[int, int, int | None]:
    """(offset, size, index) of the volume: see :func:`templatetool.disk.locate_volume`."""
    return locate_volume(dev, partition, want)


def _copy_span(
    src: BlockDevice, dst: BlockDevice, offset: int, length: int, bar: Any, dst_offset: int | None = None
) -> None:
    """Copy src[offset:offset+length] to dst (same offset unless given), skipping zero chunks."""
    delta = (offset if dst_offset is None else dst_offset) - offset
    done = offset
    for o, n in src.allocated_ranges(offset, length):
        bar.update(o - done)
        pos = o
        while pos < o + n:
            k = min(CHUNK, o + n - pos)
            data = src.read(pos, k)
            if not is_zero(data):
                dst.write(pos + delta, data)
            pos += k
            bar.update(k)
        done = o + n
    bar.update(offset + length - done)


def _copy_outside(src: BlockDevice, dst: BlockDevice, vol_off: int, vol_size: int, desc: str) -> None:
    with progress(src.size - vol_size, desc) as bar:
        _copy_span(src, dst, 0, vol_off, bar)
        _copy_span(src, dst, vol_off + vol_size, src.size - vol_off - vol_size, bar)


def _source_free_map(view: BlockDevice) -> Any:
    """The source volume's NTFS free map, or None when it cannot drive a skip (as in
    :func:`free_space`: an I/O problem still raises)."""
    from ..catalog.ntfs import ntfs_free_map
    from ..errors import TemplateToolError

    try:
        return ntfs_free_map(view)
    except TemplateToolError as e:
        if isinstance(e, ResourceError):
            raise
        return None


@dataclass
class FreeSpace:
    """The free-space decision for one pass over a volume.

    ``skip`` is the ``skip(offset, length)`` function (None: every chunk is processed);
    ``used`` whether the optimisation applies; ``reason`` why not (or what it is based on);
    ``filesystem`` what :func:`~templatetool.disk.sniff_filesystem` saw; ``skipped_bytes`` is
    filled in by the caller after the pass.
    """

    skip: Any
    used: bool
    reason: str
    filesystem: str | None
    skipped_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "reason": self.reason,
            "filesystem": self.filesystem,
            "skipped_bytes": self.skipped_bytes,
        }


def free_space(view: BlockDevice, fs_view: BlockDevice | None = None, free_map: Any = None) -> FreeSpace:
    """Decide whether a pass over ``view`` may skip free space, and how (never raises for the
    filesystem's sake).

    The skip is an optimisation only: it is used when the filesystem read from ``fs_view``
    (default ``view``: for decryption, the plaintext view of an encrypted volume) is NTFS and its
    $Bitmap parses cleanly. Any other content (FAT32, exFAT, ReFS, a damaged NTFS, random bytes)
    gives ``used=False`` with the reason, and the caller processes the whole volume.
    """
    from ..catalog.ntfs import ntfs_free_map
    from ..errors import TemplateToolError

    fsv = fs_view if fs_view is not None else view
    fs = sniff_filesystem(fsv)
    if fs != "ntfs":
        return FreeSpace(
            None, False, f"the volume holds {fs or 'no recognised filesystem'}, not NTFS: whole volume processed", fs
        )
    try:
        fm = free_map if free_map is not None else ntfs_free_map(fsv)
    except TemplateToolError as e:
        if isinstance(e, ResourceError):
            raise  # an I/O problem is not a filesystem verdict
        return FreeSpace(None, False, f"NTFS free-cluster map unusable ({e.what}): whole volume processed", fs)
    return FreeSpace(_skipper(view, fsv, fm), True, "NTFS $Bitmap: free clusters that are unallocated are skipped", fs)


def sparse_skipper(view: BlockDevice, fs_view: BlockDevice | None = None, free_map: Any = None) -> Any:
    """``skip(offset, length)``: True when the span is unallocated in ``view`` (a VHDX hole or a
    sparse-file hole) **and** every NTFS cluster in it is free (NTFS read from ``fs_view``,
    default ``view``: for decryption, the plaintext view of an encrypted volume).

    Such spans stay unallocated in the output: time and output size then follow the used data,
    not the virtual size. Returns None (never skip) for non-NTFS volumes and for an NTFS whose
    $Bitmap cannot be read (see :func:`free_space`, which also says why). ``free_map``: the
    volume's :class:`~templatetool.catalog.ntfs.FreeMap` when the caller already read it.
    """
    return free_space(view, fs_view, free_map).skip


def _skipper(view: BlockDevice, fsv: BlockDevice, fm: Any) -> Any:
    import bisect

    starts: list[int] = []
    ends: list[int] = []
    for o, n in view.allocated_ranges():
        starts.append(o)
        ends.append(o + n)

    def skip(offset: int, length: int) -> bool:
        i = bisect.bisect_right(starts, offset + length - 1) - 1
        if i >= 0 and ends[i] > offset:
            return False  # overlaps allocated data
        # every cluster free (None: beyond the cluster map, e.g. the NTFS backup boot sector)
        return bool(fm.all_free(offset, length))

    def chunk_mask(chunk: int) -> np.ndarray | None:
        """``skip`` for every whole ``chunk``-sized span of the volume at once (the last, partial
        span is never skipped); None when the cluster size does not divide ``chunk``."""
        cs = fm.cluster_size
        if chunk % cs:
            return None
        nchunks = fsv.size // chunk
        any_used = fm.any_used_per(chunk // cs, nchunks)
        if any_used is None:
            return None
        mask = ~any_used
        for o, e in zip(starts, ends, strict=True):
            mask[o // chunk : min(nchunks, -(-e // chunk))] = False
        full = np.zeros(-(-view.size // chunk), dtype=bool)
        full[:nchunks] = mask
        return full

    skip.chunk_mask = chunk_mask  # type: ignore[attr-defined]
    return skip


def encrypt_disk(
    src_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    partition: int | None = None,
    method: str = "xts-aes-128",
    protectors: list[ProtectorSpec] | None = None,
    description: str | None = None,
    *,
    sparse: bool = True,
    tap: Any = None,
    tap_zeros: Any = None,
    worker_tap: Any = None,
    on_tap: Any = None,
    on_result: Any = None,
    workers: int | None = None,
    free_map: Any = None,
    subformat: str = "dynamic",
) -> dict[str, Any]:
    """Write ``out_path``: a copy of ``src_path`` with its OS volume (or ``partition``) encrypted.

    When the volume already carries BitLocker's reservation (a protected template), it is
    encrypted straight from the source; otherwise the reservation is made in a metadata overlay
    beside the output (:class:`~templatetool.disk.overlay.MetadataOverlay`) and the pass reads
    the overlay over the source: one read of the source, one write of the output either way.
    With ``sparse`` (default), chunks that are free in NTFS and unallocated (for a volume that
    was not reserved: or all zeros) in the source stay unallocated in the output.
    ``tap(offset, plaintext)`` / ``tap_zeros(offset, length)`` see the plaintext volume as it is
    read (skipped chunks as zeros), in order, for measuring in the same pass; ``worker_tap`` /
    ``on_tap`` do the same with the work split (see :func:`encrypt_volume`), which is faster.
    ``free_map``: the source volume's NTFS free map when the caller already read it (the sparse
    decision for a reserved template; which free chunks are zeros for one that is not).
    ``on_result(EncryptResult)`` runs after encryption and before the output is renamed into
    place (e.g. to save key files first); if it raises, no output appears.
    ``subformat``: fixed or dynamic, for a VHDX output.

    Returns a dict with the partition index, volume offset/size, whether the regions were
    already reserved, ``skipped_bytes`` and ``result`` (the :class:`EncryptResult`).
    """
    if not protectors:
        raise UsageError("at least one key protector is needed")
    if Path(src_path).resolve() == Path(out_path).resolve():
        raise UsageError("the output must be a new file, not the input", str(out_path))
    src = open_disk(src_path, writable=False)
    skipped = 0
    try:
        vol_off, vol_size, index = _pick(src, partition, ("ntfs",))
        view = View(src, vol_off, vol_size, name=f"{src.name} volume@{vol_off}")
        fs = sniff_filesystem(view)
        if fs == "bitlocker":
            raise UsageError("the volume is already BitLocker-encrypted", view.name)
        if fs != "ntfs":
            raise UnsupportedError(
                f"the volume holds {fs or 'no known filesystem'}, not NTFS",
                view.name,
                "BitLocker regions are reserved inside NTFS only",
            )
        out_dir = Path(out_path).parent if str(Path(out_path).parent) else Path(".")
        regions = find_reserved(view)
        already = regions is not None
        with atomic_output(out_path) as tmp_out, contextlib.ExitStack() as stack:
            if regions is None:
                overlay = stack.enter_context(MetadataOverlay(view, out_dir))
                regions = reserve_ntfs(overlay.path)
                src_fm = (free_map if free_map is not None else _source_free_map(view)) if sparse else None
                plain: BlockDevice = stack.enter_context(overlay.merged(sector_size=src.sector_size, free_map=src_fm))
            else:
                plain = view
            skip = sparse_skipper(plain, free_map=free_map if already else None) if sparse else None

            def on_skip(off: int, n: int) -> None:
                nonlocal skipped
                skipped += n
                if tap_zeros is not None:
                    tap_zeros(off, n)

            eng = engine_for(workers)
            out = create_disk(tmp_out, src.size, like=src, fmt=_out_format(out_path), subformat=subformat)
            out.set_direct_io(eng.direct_io)
            try:
                _copy_outside(src, out, vol_off, vol_size, "copy disk")
                result: EncryptResult = encrypt_volume(
                    plain,
                    View(out, vol_off, vol_size, name=f"{out_path} volume@{vol_off}"),
                    method=method,
                    protectors=protectors,
                    regions=regions,
                    description=description,
                    taps=PassTaps(skip=skip, on_skip=on_skip, tap=tap, worker_tap=worker_tap, on_tap=on_tap),
                    engine=eng,
                )
                out.flush()
                if on_result is not None:
                    on_result(result)
            finally:
                out.close()
    finally:
        src.close()
    return {
        "input": str(src_path),
        "output": str(out_path),
        "partition": index,
        "volume_offset": vol_off,
        "volume_size": vol_size,
        "reused_reservation": already,
        "skipped_bytes": skipped,
        "result": result,
    }


def decrypt_disk(
    src_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    partition: int | None,
    credentials: Credentials,
    *,
    sparse: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write ``out_path``: a copy of ``src_path`` with the BitLocker volume decrypted.

    Decryption never depends on the filesystem inside the volume. With ``sparse`` (default) and
    an inner NTFS whose $Bitmap parses cleanly, spans left unallocated by a sparse encryption
    (unallocated in the encrypted disk and free in the decrypted NTFS) are left unallocated
    (zeros) again, so a sparse shield + decrypt round trip gives back the template's bytes
    exactly; any other content (FAT32, exFAT, ReFS, damaged NTFS, unknown) is decrypted whole.
    The result's ``free_space`` says which (``used``, ``reason``, ``filesystem``, ``skipped_bytes``).
    """
    if Path(src_path).resolve() == Path(out_path).resolve():
        raise UsageError("the output must be a new file, not the input", str(out_path))
    src = open_disk(src_path, writable=False)
    try:
        vol_off, vol_size, index = _pick(src, partition, ("bitlocker", "bitlocker-to-go"))
        view = View(src, vol_off, vol_size, name=f"{src.name} volume@{vol_off}")
        fve = open_fve(view)
        plain = unlock_with(fve, credentials)
        if sparse:
            fsp = free_space(view, plain)
        else:
            fsp = FreeSpace(None, False, "sparse output not requested: whole volume processed", None)

        def on_skip(off: int, n: int) -> None:
            fsp.skipped_bytes += n

        eng = engine_for(workers)
        with atomic_output(out_path) as tmp_out:
            out = create_disk(tmp_out, src.size, like=src, fmt=_out_format(out_path))
            out.set_direct_io(eng.direct_io)
            try:
                _copy_outside(src, out, vol_off, vol_size, "copy disk")
                dst = View(out, vol_off, vol_size)
                decrypt_volume(plain, dst, skip=fsp.skip, engine=eng, on_skip=on_skip)
                out.flush()
            finally:
                out.close()
    finally:
        src.close()
    return {
        "input": str(src_path),
        "output": str(out_path),
        "partition": index,
        "volume_offset": vol_off,
        "volume_size": vol_size,
        "method": fve.info()["method"],
        "layout": fve.layout,
        "free_space": fsp.to_json(),
    }
