"""LUKS2 written and read natively: header copies, keyslots (AF-split + PBKDF2/Argon2), the
PBKDF2 digest, aes-xts-plain64 data, and the systemd-tpm2 token (docs/formats/luks2.md)."""

from .kdf import KdfParams
from .metadata import LuksHeader, read_header
from .volume import KeyslotSpec, decrypt_image, describe, encrypt_image, unlock

__all__ = [
    "KdfParams",
    "KeyslotSpec",
    "LuksHeader",
    "decrypt_image",
    "describe",
    "encrypt_image",
    "read_header",
    "unlock",
]
