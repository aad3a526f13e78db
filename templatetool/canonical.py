"""Canonical JSON: the one byte form our signed documents (VSC, PDK) are made of and checked against.

``canonical_json`` = sorted keys, no spaces, UTF-8, no NaN. ``parse_strict`` refuses duplicate
keys and floating-point numbers (both would let two byte strings mean the same document).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import FormatError


def canonical_json(obj: Any) -> bytes:
    """The canonical byte form of a JSON value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json.loads that refuses a repeated member (FormatError)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_float(text: str) -> Any:
    raise FormatError("floating-point numbers are not allowed")


def parse_strict(data: bytes, what: str) -> Any:
    """Parse JSON refusing duplicate keys and floats; FormatError naming ``what`` when malformed."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys, parse_float=_no_float)
    except FormatError as e:
        raise FormatError(f"malformed {what}: {e.what}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"malformed {what}: {e}") from None


def load_canonical(data: bytes, what: str) -> dict[str, Any]:
    """Parse a canonical JSON object; FormatError when malformed or not in canonical form."""
    obj = parse_strict(data, what)
    if not isinstance(obj, dict) or canonical_json(obj) != data:
        raise FormatError(f"the {what} is not in canonical form")
    return obj
