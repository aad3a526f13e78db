"""templatetool.tpm: offline TPM 2.0 sealing to a (v)TPM.

TPM2 marshalling (structs), PolicyPCR/PolicyAuthValue digests (policy), TPM2_Import blobs for
sealed-data objects under RSA/ECC parents (duplicate), parent keys and software vTPM keys (keys),
TCG event-log replay (eventlog), the BitLocker vTPM protector (protector), the TPM client
(tpmclient, tpm2-pytss) and a swtpm runner (swtpm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protector import make_sealer, parse_protector, unseal_with_software_key, unseal_with_tpm


def __getattr__(name: str) -> Any:  # lazy: tpm.algs alone (PCR option parsing) stays cheap
    if name in __all__:
        from . import protector

        return getattr(protector, name)
    raise AttributeError(name)


__all__ = ["make_sealer", "parse_protector", "unseal_with_software_key", "unseal_with_tpm"]
