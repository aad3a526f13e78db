"""Guardians: name + signing and encryption certificates (+ keys when ours); HGS metadata XML."""

from .metadata import KPS_NS, export_metadata, import_metadata
from .model import (
                    Guardian,
                    check_chain,
                    check_guardian,
                    check_usage,
                    check_validity,
                    describe_certificate,
                    generate_guardian,
                    guardian_from_certificates,
                    load_guardian,
                    save_guardian,
)

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
