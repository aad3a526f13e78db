"""Guardians: name + signing and encryption certificates (+ keys when ours); HGS metadata XML.

Layers (no import cycle): ``core`` (the Guardian type and certificate checks) ← ``metadata``
(HGS metadata XML) ← ``model`` (folders, generation, loading); ``sigalg`` is the leaf both use.
"""

from .core import (
    Guardian,
    check_chain,
    check_guardian,
    check_usage,
    check_validity,
    describe_certificate,
)
from .metadata import KPS_NS, export_metadata, import_metadata
from .model import generate_guardian, guardian_from_certificates, load_guardian, save_guardian

__all__ = [
    "KPS_NS",
    "Guardian",
    "check_chain",
    "check_guardian",
    "check_usage",
    "check_validity",
    "describe_certificate",
    "export_metadata",
    "generate_guardian",
    "guardian_from_certificates",
    "import_metadata",
    "load_guardian",
    "save_guardian",
]
