"""Shielding data files (PDK): signed clear part + AuthEnvelopedData secret part (docs/formats/pdk.md)."""

from .document import OTHER_FILES_LIMIT, POLICIES, NamedFile, SecretPart
from .shielding import (
    GuardianSigner,
    PdkInfo,
    check_template,
    create_pdk,
    open_pdk_secret,
    read_pdk,
)

__all__ = [
    "OTHER_FILES_LIMIT",
    "POLICIES",
    "GuardianSigner",
    "NamedFile",
    "PdkInfo",
    "SecretPart",
    "check_template",
    "create_pdk",
    "open_pdk_secret",
    "read_pdk",
]
