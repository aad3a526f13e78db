"""[MS-KPS] key protectors: a secret wrapped to an owner and guardians (docs/formats/kp.md)."""

from .protector import (
    HMAC_SHA256,
    URN_CMS_AEAD,
    URN_KDF,
    create_kp,
    grant,
    inspect_kp,
    parse_kp,
    revoke,
    unwrap,
)

__all__ = ["HMAC_SHA256", "URN_CMS_AEAD", "URN_KDF", "create_kp", "grant", "inspect_kp", "parse_kp", "revoke", "unwrap"]
