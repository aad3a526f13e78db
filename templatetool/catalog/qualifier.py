"""Volume ID qualifiers: which signed templates a shielding data file (PDK) accepts.

Microsoft's semantics (New-VolumeIDQualifier / tenant guide): the disk **name and signing
certificate must match exactly** before the version is compared with the rule
``eq`` (Equals), ``ge`` (GreaterThanOrEquals) or ``gt`` (GreaterThan).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import FormatError, UsageError
from .document import Version, as_version, format_version, parse_version


class CatalogIdentity(Protocol):
    """What a qualifier compares: a signed catalog's name, signer and version (e.g. a VscInfo)."""

    @property
    def name(self) -> str: ...
    @property
    def signer_thumbprint(self) -> str: ...
    @property
    def version(self) -> str | Sequence[int]: ...


RULES = {"eq": "Equals", "ge": "GreaterThanOrEquals", "gt": "GreaterThan"}
_ALIASES = {"equals": "eq", "greaterthanorequals": "ge", "greaterthan": "gt", "==": "eq", ">=": "ge", ">": "gt"}


def normalize_rule(rule: str) -> str:
    """``eq|ge|gt`` (also accepts Microsoft's names)."""
    r = rule.strip().lower()
    r = _ALIASES.get(r, r)
    if r not in RULES:
        raise UsageError(f"unknown version rule {rule!r}", hint="use eq, ge or gt")
    return r


def _norm_thumb(t: str) -> str:
    return t.replace(":", "").replace(" ", "").upper()


@dataclass(frozen=True)
class VolumeIdQualifier:
    """Accept templates named ``name``, signed by the certificate ``signer_thumbprint``
    (SHA-1, hex), with a version satisfying ``rule`` against ``version``."""

    name: str
    signer_thumbprint: str
    version: Version
    rule: str = "eq"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", normalize_rule(self.rule))
        object.__setattr__(self, "signer_thumbprint", _norm_thumb(self.signer_thumbprint))
        if isinstance(self.version, str):
            object.__setattr__(self, "version", parse_version(self.version))

    @classmethod
    def from_vsc(cls, info: CatalogIdentity, rule: str = "eq") -> VolumeIdQualifier:
        """A qualifier for exactly this signed catalog's name and signer (``rule`` on its version)."""
        return cls(info.name, info.signer_thumbprint, as_version(info.version), rule)

    def matches(self, catalog_info: CatalogIdentity) -> tuple[bool, str]:
        """Does a signed catalog (``.name``, ``.signer_thumbprint``, ``.version``) qualify?"""
        name = catalog_info.name
        thumb = _norm_thumb(catalog_info.signer_thumbprint)
        ver = as_version(catalog_info.version)
        if name != self.name:
            return False, f"template name {name!r} is not {self.name!r}"
        if thumb != self.signer_thumbprint:
            return False, f"signer {thumb} is not {self.signer_thumbprint}"
        ok = {"eq": ver == self.version, "ge": ver >= self.version, "gt": ver > self.version}[self.rule]
        rel = {"eq": "equal to", "ge": "at least", "gt": "greater than"}[self.rule]
        if not ok:
            return False, f"version {format_version(ver)} is not {rel} {format_version(self.version)}"
        return True, f"{name} {format_version(ver)} signed by {thumb} ({rel} {format_version(self.version)})"

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "signer_thumbprint": self.signer_thumbprint,
            "version": format_version(self.version),
            "rule": self.rule,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VolumeIdQualifier:
        try:
            return cls(
                str(d["name"]), str(d["signer_thumbprint"]), parse_version(str(d["version"])), str(d.get("rule", "eq"))
            )
        except (KeyError, TypeError, UsageError) as e:
            raise FormatError(f"bad volume ID qualifier: {e}") from None
