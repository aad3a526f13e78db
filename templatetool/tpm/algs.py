"""Hash algorithm identifiers, PCR banks and PCR selection bitmaps."""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.hazmat.primitives import hashes

from ..errors import UnsupportedError, UsageError
from . import structs as s

#: TPM_ALG_ID -> (name, cryptography hash class). sm3_256 is recognised by name only.
HASH_ALGS: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    s.ALG_SHA1: ("sha1", hashes.SHA1),
    s.ALG_SHA256: ("sha256", hashes.SHA256),
    s.ALG_SHA384: ("sha384", hashes.SHA384),
    s.ALG_SHA512: ("sha512", hashes.SHA512),
}
ALG_BY_NAME: dict[str, int] = {name: alg for alg, (name, _) in HASH_ALGS.items()}
ALG_NAMES: dict[int, str] = {alg: name for alg, (name, _) in HASH_ALGS.items()} | {s.ALG_SM3_256: "sm3_256"}

#: PCRs in a PC Client TPM; selections are always 3 bytes (sizeofSelect = 3).
NUM_PCRS = 24
SIZEOF_SELECT = 3


def hash_alg(alg: int | str) -> hashes.HashAlgorithm:
    """A cryptography hash object for a TPM_ALG_ID or a bank name ("sha256")."""
    alg_id = bank_id(alg)
    try:
        return HASH_ALGS[alg_id][1]()
    except KeyError:
        raise UnsupportedError(
            f"hash algorithm 0x{alg_id:04x} is not supported", hint="use sha1, sha256, sha384 or sha512"
        ) from None


def bank_id(bank: int | str) -> int:
    """TPM_ALG_ID of a bank given by id or name."""
    if isinstance(bank, int):
        return bank
    try:
        return ALG_BY_NAME[bank.lower().replace("-", "")]
    except KeyError:
        raise UsageError(f"unknown PCR bank {bank!r}", hint="use sha1, sha256, sha384 or sha512") from None


def bank_name(alg: int) -> str:
    """The conventional name of a bank ("sha256"), or its hex id."""
    return ALG_NAMES.get(alg, f"0x{alg:04x}")


def digest_size(alg: int | str) -> int:
    """Digest size in bytes of a hash algorithm."""
    return hash_alg(alg).digest_size


def hash_bytes(alg: int | str, *parts: bytes) -> bytes:
    """H(parts[0] || parts[1] || ...)."""
    h = hashes.Hash(hash_alg(alg))
    for p in parts:
        h.update(p)
    return h.finalize()


def check_pcrs(pcrs: Iterable[int]) -> list[int]:
    """Sorted, de-duplicated PCR indices; each must be 0..23."""
    items = list(pcrs)
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise UsageError(f"PCR index {str(i)[:12]!r} is not a number", hint="PCRs are 0..23")
    out = sorted(set(items))
    for i in out:
        if not 0 <= i < NUM_PCRS:
            raise UsageError(f"PCR index {i} out of range", hint="PCRs are 0..23")
    return out


def pcr_bitmap(pcrs: Iterable[int]) -> bytes:
    """The 3-byte pcrSelect bitmap: PCR i sets bit i%8 of byte i//8."""
    bm = bytearray(SIZEOF_SELECT)
    for i in check_pcrs(pcrs):
        bm[i // 8] |= 1 << (i % 8)
    return bytes(bm)


def pcrs_from_bitmap(bitmap: bytes) -> list[int]:
    """PCR indices set in a pcrSelect bitmap."""
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def pcr_mask(pcrs: Iterable[int]) -> int:
    """PCR set as an integer with bit i for PCR i (BitLocker's u32 PcrBitmap)."""
    return sum(1 << i for i in check_pcrs(pcrs))


def parse_pcr_list(text: str) -> list[int]:
    """Parse "7,11" or "0-4,7" into sorted PCR indices."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UsageError(f"bad PCR list {text!r}", hint="use e.g. 7,11 or 0-4,7") from None
    if not out:
        raise UsageError("empty PCR list", hint="give PCR indices, e.g. 7 and 11", code="tpm.pcrs-empty")
    return check_pcrs(out)


__all__ = [
    "ALG_BY_NAME",
    "ALG_NAMES",
    "HASH_ALGS",
    "NUM_PCRS",
    "bank_id",
    "bank_name",
    "check_pcrs",
    "digest_size",
    "hash_alg",
    "hash_bytes",
    "parse_pcr_list",
    "pcr_bitmap",
    "pcr_mask",
    "pcrs_from_bitmap",
]
