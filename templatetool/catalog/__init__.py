"""Volume Signature Catalog (VSC): measure a volume, describe it, sign it, verify it.

The format is ours and documented in docs/formats/vsc.md. A signed catalog is a DER CMS
SignedData whose content is the canonical-JSON catalog document; it travels inside the
template VHDX as the user metadata item :data:`VSC_METADATA_GUID` and as a ``.vsc`` file.
"""

from __future__ import annotations

import uuid

#: VHDX user metadata item holding the signed catalog (templatetool's own GUID).
VSC_METADATA_GUID = uuid.UUID("cacb4f3d-37ce-4234-b403-fcfdc5e1fb8d")

#: The catalog document format identifier and version (docs/formats/vsc.md).
VSC_FORMAT = "templatetool-vsc"
VSC_FORMAT_VERSION = 1

#: Default measurement block size (1 MiB).
DEFAULT_BLOCK_SIZE = 1 << 20

__all__ = ["VSC_METADATA_GUID", "VSC_FORMAT", "VSC_FORMAT_VERSION", "DEFAULT_BLOCK_SIZE",
           "CatalogDocument", "VolumeInfo", "parse_version", "Measurer", "measure_volume", "Measurement", "FreeMap",
           "ntfs_free_map", "files_in_ranges", "VscInfo", "open_vsc", "read_vsc_bytes", "sign_catalog",
           "verify_template", "compare_volume", "VerifyReport", "VolumeIdQualifier"]

_LAZY = {
    "CatalogDocument": "document", "VolumeInfo": "document", "parse_version": "document",
    "Measurer": "measure", "measure_volume": "measure", "Measurement": "measure",
    "FreeMap": "ntfs", "ntfs_free_map": "ntfs", "files_in_ranges": "ntfs",
    "VscInfo": "vsc", "open_vsc": "vsc", "read_vsc_bytes": "vsc", "sign_catalog": "vsc",
    "verify_template": "vsc", "compare_volume": "vsc", "VerifyReport": "vsc",
    "VolumeIdQualifier": "qualifier",
}


def __getattr__(name: str) -> object:
    """Lazy re-exports (``from templatetool.catalog import open_vsc``) without import cycles."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
