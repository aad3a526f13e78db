"""TPM 2.0 attestation structures (Part 2 §10.12 TPMS_ATTEST, §11.3 TPMT_SIGNATURE), with ``construct``.

Big-endian, as the TPM marshals them. Only the quote path is declared; no logic here.
"""

from __future__ import annotations

from typing import Any

from construct import GreedyBytes, Int8ub, Int16ub, Int32ub, Int64ub, Prefixed, Struct, Switch, Terminated, this

from ..tpm.structs import ALG_ECC, TPML_PCR_SELECTION

#: TPM_GENERATED_VALUE: every TPMS_ATTEST the TPM signs starts with it.


def _tpm2b() -> Any:
    """A TPM2B of raw bytes (tpm.structs.TPM2B, typed here)."""
    return Prefixed(Int16ub, GreedyBytes)


TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018

TPMS_CLOCK_INFO = Struct("clock" / Int64ub, "resetCount" / Int32ub, "restartCount" / Int32ub, "safe" / Int8ub)
TPMS_QUOTE_INFO = Struct("pcrSelect" / TPML_PCR_SELECTION, "pcrDigest" / _tpm2b())

TPMS_ATTEST_QUOTE = Struct(
    "magic" / Int32ub,
    "type" / Int16ub,
    "qualifiedSigner" / _tpm2b(),
    "extraData" / _tpm2b(),
    "clockInfo" / TPMS_CLOCK_INFO,
    "firmwareVersion" / Int64ub,
    "attested" / TPMS_QUOTE_INFO,
    Terminated,
)

TPMS_SIGNATURE_RSA = Struct("hash" / Int16ub, "sig" / _tpm2b())
TPMS_SIGNATURE_ECC = Struct("hash" / Int16ub, "r" / _tpm2b(), "s" / _tpm2b())
TPMT_SIGNATURE = Struct(
    "sigAlg" / Int16ub,
    "signature"
    / Switch(
        this.sigAlg,
        {ALG_RSASSA: TPMS_SIGNATURE_RSA, ALG_RSAPSS: TPMS_SIGNATURE_RSA, ALG_ECDSA: TPMS_SIGNATURE_ECC},
        default=Prefixed(Int16ub, GreedyBytes),
    ),
    Terminated,
)

#: TPM2B_ID_OBJECT contents: integrityHMAC (TPM2B) || encIdentity.
ID_OBJECT = Struct("integrityHMAC" / _tpm2b(), "encIdentity" / GreedyBytes)

__all__ = [
    "ALG_ECC",
    "ALG_ECDSA",
    "ALG_RSAPSS",
    "ALG_RSASSA",
    "ID_OBJECT",
    "ST_ATTEST_QUOTE",
    "TPMS_ATTEST_QUOTE",
    "TPMT_SIGNATURE",
    "TPM_GENERATED",
]
