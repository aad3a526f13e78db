"""Offline TPM 2.0 policy digests: PolicyPCR and PolicyAuthValue (TPM 2.0 Part 3, 23.7 / 23.18).

A policy digest starts as zeros of the policy hash size; each assertion extends it:
``D' = H(D || u32 commandCode || parameters)``. PolicyPCR's parameters are the TPML_PCR_SELECTION
and ``pcrDigest = H(PCR[i0] || PCR[i1] || ...)`` in ascending PCR order, hashed with the *policy*
hash (not the bank hash).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import UsageError
from . import structs as s
from .algs import bank_id, bank_name, check_pcrs, digest_size, hash_bytes, pcr_bitmap


def pcr_selection(bank: int | str, pcrs: Sequence[int]) -> bytes:
    """Marshalled TPML_PCR_SELECTION with one bank and sizeofSelect = 3."""
    sel: bytes = s.TPML_PCR_SELECTION.build([{"hash": bank_id(bank), "pcrSelect": pcr_bitmap(pcrs)}])
    return sel


def pcr_digest(pcr_values: Mapping[int, bytes], bank: int | str, policy_alg: int | str = "sha256") -> bytes:
    """H_policy(PCR values of the selected PCRs in ascending order); values are checked for size."""
    size = digest_size(bank)
    parts = []
    for i in check_pcrs(pcr_values):
        v = pcr_values[i]
        if len(v) != size:
            raise UsageError(
                f"PCR {i} value has {len(v)} bytes, the {bank_name(bank_id(bank))} bank needs {size}",
                hint="give the full hex digest of the bank",
            )
        parts.append(v)
    return hash_bytes(policy_alg, *parts)


def extend_policy_pcr(digest: bytes, selection: bytes, pcr_dig: bytes, policy_alg: int | str = "sha256") -> bytes:
    """PolicyPCR: H(D || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || pcrDigest)."""
    return hash_bytes(policy_alg, digest, struct.pack(">I", s.CC_POLICY_PCR), selection, pcr_dig)


def extend_policy_auth_value(digest: bytes, policy_alg: int | str = "sha256") -> bytes:
    """PolicyAuthValue (same digest as PolicyPassword): H(D || TPM_CC_PolicyAuthValue)."""
    return hash_bytes(policy_alg, digest, struct.pack(">I", s.CC_POLICY_AUTH_VALUE))


@dataclass(frozen=True)
class Policy:
    """A computed PCR [+ auth value] policy."""

    bank: int
    pcrs: tuple[int, ...]
    policy_alg: int
    selection: bytes  # marshalled TPML_PCR_SELECTION
    pcr_digest: bytes
    commands: tuple[int, ...]  # command codes in assertion order
    digest: bytes  # the authPolicy

    def to_json(self) -> dict[str, object]:
        return {
            "bank": bank_name(self.bank),
            "pcrs": list(self.pcrs),
            "policy_hash": bank_name(self.policy_alg),
            "pcr_digest": self.pcr_digest.hex(),
            "policy": [COMMAND_NAMES.get(c, hex(c)) for c in self.commands],
            "policy_digest": self.digest.hex(),
        }


COMMAND_NAMES: dict[int, str] = {s.CC_POLICY_PCR: "PolicyPCR", s.CC_POLICY_AUTH_VALUE: "PolicyAuthValue"}


def compute_policy(
    bank: int | str,
    pcr_values: Mapping[int, bytes],
    *,
    auth_value: bool = False,
    policy_alg: int | str = "sha256",
    commands: Sequence[int] | None = None,
) -> Policy:
    """The policy digest for PolicyPCR over ``pcr_values`` (bank ``bank``), then PolicyAuthValue
    when ``auth_value`` (a PIN). ``commands`` overrides the assertion order (for replaying a
    recorded protector)."""
    if not pcr_values:
        raise UsageError("no PCRs selected", hint="give PCR indices and their values", code="tpm.no-pcrs")
    b = bank_id(bank)
    pa = bank_id(policy_alg)
    pcrs = tuple(check_pcrs(pcr_values))
    sel = pcr_selection(b, pcrs)
    pd = pcr_digest(pcr_values, b, pa)
    if commands is None:
        commands = (s.CC_POLICY_PCR,) + ((s.CC_POLICY_AUTH_VALUE,) if auth_value else ())
    d = bytes(digest_size(pa))
    for cc in commands:
        if cc == s.CC_POLICY_PCR:
            d = extend_policy_pcr(d, sel, pd, pa)
        elif cc == s.CC_POLICY_AUTH_VALUE:
            d = extend_policy_auth_value(d, pa)
        else:
            raise UsageError(f"unsupported policy command 0x{cc:x}")
    return Policy(b, pcrs, pa, sel, pd, tuple(commands), d)


def parse_pcr_values(spec: str, bank: int | str = "sha256") -> dict[int, bytes]:
    """PCR values from ``7=HEX,11=HEX`` or from a file: JSON (``tpm pcrs --json`` output,
    ``{"sha256": {"7": HEX}}`` or ``{"7": HEX}``) or text lines ``7=HEX`` / ``7: HEX``."""
    import json
    import os

    from .algs import ALG_NAMES

    text = spec
    where = "--pcr-values"
    if os.path.isfile(spec):
        where = spec
        try:
            with open(spec, encoding="utf-8") as f:
                text = f.read(1 << 20)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read PCR values file: {e}", spec) from None
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                doc = json.loads(stripped)
            except ValueError as e:
                raise UsageError(f"PCR values file is not valid JSON: {e}", spec) from None
            if isinstance(doc, dict) and isinstance(doc.get("result"), dict):  # the --json envelope
                doc = doc["result"]
            if isinstance(doc, dict) and "banks" in doc:
                doc = doc["banks"]
            name = ALG_NAMES.get(bank_id(bank), str(bank))
            if isinstance(doc, dict) and name in doc and isinstance(doc[name], dict):
                doc = doc[name]
            if not isinstance(doc, dict):
                raise UsageError("PCR values JSON must map PCR index to hex", spec)
            pairs = list(doc.items())
            return _pairs_to_values(pairs, bank, where)
    items = [p for chunk in text.replace(";", ",").splitlines() for p in chunk.split(",")]
    pairs = []
    for item in items:
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        sep = "=" if "=" in item else ":"
        if sep not in item:
            raise UsageError(f"bad PCR value {item[:40]!r}", where, "use 7=HEX,11=HEX")
        k, v = item.split(sep, 1)
        pairs.append((k, v))
    return _pairs_to_values(pairs, bank, where)


def _pairs_to_values(pairs: list[tuple[object, object]], bank: int | str, where: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    size = digest_size(bank)
    for k, v in pairs:
        try:
            i = int(str(k).strip())
            val = bytes.fromhex(str(v).strip().removeprefix("0x"))
        except ValueError:
            raise UsageError(f"bad PCR value for {str(k)[:10]!r}", where, "use decimal index and hex digest") from None
        check_pcrs([i])
        if len(val) != size:
            raise UsageError(
                f"PCR {i} value has {len(val)} bytes, the {bank_name(bank_id(bank))} bank needs {size}", where
            )
        out[i] = val
    if not out:
        raise UsageError("no PCR values given", where)
    return out


__all__ = [
    "compute_policy",
    "extend_policy_auth_value",
    "extend_policy_pcr",
    "parse_pcr_values",
    "pcr_digest",
    "pcr_selection",
]
