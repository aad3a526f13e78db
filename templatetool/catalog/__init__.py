"""Volume Signature Catalog (VSC): measure a volume, describe it, sign it, verify it.

The format is ours and documented in docs/formats/vsc.md. A signed catalog is a DER CMS
SignedData whose content is the canonical-JSON catalog document; it travels inside the
template VHDX as the user metadata item :data:`VSC_METADATA_GUID` and as a ``.vsc`` file.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

#: VHDX user metadata item holding the signed catalog (templatetool's own GUID).
VSC_METADATA_GUID = uuid.UUID("cacb4f3d-37ce-4234-b403-fcfdc5e1fb8d")

#: The catalog document format identifier and version (docs/formats/vsc.md).
VSC_FORMAT = "templatetool-vsc"
VSC_FORMAT_VERSION = 1

#: Default measurement block size (1 MiB).
DEFAULT_BLOCK_SIZE = 1 << 20

if TYPE_CHECKING:
    from .document import CatalogDocument, VolumeInfo, parse_version
    from .measure import Measurement, Measurer, measure_volume
    from .ntfs import FreeMap, files_in_ranges, ntfs_free_map
    from .qualifier import VolumeIdQualifier
    from .vsc import VerifyReport, VscInfo, compare_volume, open_vsc, read_vsc_bytes, sign_catalog, verify_template

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "VSC_FORMAT",
    "VSC_FORMAT_VERSION",
    "VSC_METADATA_GUID",
    "CatalogDocument",
    "FreeMap",
    "Measurement",
    "Measurer",
    "VerifyReport",
    "VolumeIdQualifier",
    "VolumeInfo",
    "VscInfo",
    "compare_volume",
    "files_in_ranges",
    "measure_volume",
    "ntfs_free_map",
    "open_vsc",
    "parse_version",
    "read_vsc_bytes",
    "sign_catalog",
    "verify_template",
]

_LAZY = {
    "CatalogDocument": "document",
    "VolumeInfo": "document",
    "parse_version": "document",
    "Measurer": "measure",
    "measure_volume": "measure",
    "Measurement": "measure",
    "FreeMap": "ntfs",
    "ntfs_free_map": "ntfs",
    "files_in_ranges": "ntfs",
    "VscInfo": "vsc",
    "open_vsc": "vsc",
    "read_vsc_bytes": "vsc",
    "sign_catalog": "vsc",
    "verify_template": "vsc",
    "compare_volume": "vsc",
    "VerifyReport": "vsc",
    "VolumeIdQualifier": "qualifier",
}


def __getattr__(name: str) -> object:
    """Lazy re-exports (``from templatetool.catalog import open_vsc``) without import cycles."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
