"""CMS (RFC 5652): SignedData (signed.py) and AuthEnvelopedData (enveloped.py)."""

from .enveloped import RecipientDescription, RecipientKey, envelope, list_recipients, open_envelope
from .signed import SignedDataInfo, sign_data, verify_signed_data

__all__ = [
    "RecipientDescription",
    "RecipientKey",
    "SignedDataInfo",
    "envelope",
    "list_recipients",
    "open_envelope",
    "sign_data",
    "verify_signed_data",
]
