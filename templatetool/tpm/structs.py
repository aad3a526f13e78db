"""TPM 2.0 and TCG event-log binary structures, declared with ``construct``.

Only what the offline sealer, the event-log replayer and our protector payload need. TPM
structures are big-endian (TPM 2.0 Part 2); TCG PC Client event-log structures are little-endian
(TCG PC Client Platform Firmware Profile, section 10). No logic lives here beyond field layout.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from construct import (
    Bytes,
    Const,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int16ul,
    Int32ub,
    Int32ul,
    Prefixed,
    PrefixedArray,
    Struct,
    Switch,
    Terminated,
    this,
)


# --- algorithm identifiers (TPM 2.0 Part 2, TPM_ALG_ID) ---------------------------------------
class AlgId(IntEnum):
    """TPM_ALG_ID (TPM 2.0 Part 2, 6.3): the algorithms we read or write."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    ECDAA = 0x001A
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043


ALG_RSA = AlgId.RSA
ALG_SHA1 = AlgId.SHA1
ALG_HMAC = AlgId.HMAC
ALG_AES = AlgId.AES
ALG_KEYEDHASH = AlgId.KEYEDHASH
ALG_XOR = AlgId.XOR
ALG_SHA256 = AlgId.SHA256
ALG_SHA384 = AlgId.SHA384
ALG_SHA512 = AlgId.SHA512
ALG_NULL = AlgId.NULL
ALG_SM3_256 = AlgId.SM3_256
ALG_ECDAA = AlgId.ECDAA
ALG_ECC = AlgId.ECC
ALG_SYMCIPHER = AlgId.SYMCIPHER
ALG_CFB = AlgId.CFB


class EccCurve(IntEnum):
    """TPM_ECC_CURVE."""

    NIST_P256 = 0x0003
    NIST_P384 = 0x0004


ECC_NIST_P256 = EccCurve.NIST_P256
ECC_NIST_P384 = EccCurve.NIST_P384


# --- command codes used in policy digests ----------------------------------------------------
class CommandCode(IntEnum):
    """TPM_CC (TPM 2.0 Part 2, 6.5.2): the commands whose codes enter policy digests."""

    POLICY_SECRET = 0x00000151
    POLICY_AUTH_VALUE = 0x0000016B
    POLICY_PCR = 0x0000017F


CC_POLICY_AUTH_VALUE = CommandCode.POLICY_AUTH_VALUE
CC_POLICY_PCR = CommandCode.POLICY_PCR
CC_POLICY_SECRET = CommandCode.POLICY_SECRET


class ResponseCode(IntEnum):
    """TPM_RC base codes (TPM 2.0 Part 2, 6.6; format-one codes without their parameter bits)."""

    SUCCESS = 0x000
    HANDLE = 0x08B
    AUTH_FAIL = 0x08E
    POLICY_FAIL = 0x09D
    INTEGRITY = 0x09F
    BAD_AUTH = 0x0A2
    LOCKOUT = 0x921


class Handle(IntEnum):
    """TPM_HANDLE values we name: hierarchies and the well-known persistent keys."""

    RH_OWNER = 0x40000001
    RH_NULL = 0x40000007
    RS_PW = 0x40000009
    RH_LOCKOUT = 0x4000000A
    RH_ENDORSEMENT = 0x4000000B
    RH_PLATFORM = 0x4000000C
    #: Persistent handle where Windows (and the TCG provisioning guidance) keeps the SRK.
    SRK = 0x81000001
    #: Persistent handle of the RSA EK (TCG EK Credential Profile / provisioning guidance).
    EK = 0x81010001


# --- TPMA_OBJECT bits -----------------------------------------------------------------------
ATTR_FIXED_TPM = 1 << 1
ATTR_ST_CLEAR = 1 << 2
ATTR_FIXED_PARENT = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN = 1 << 5
ATTR_USER_WITH_AUTH = 1 << 6
ATTR_ADMIN_WITH_POLICY = 1 << 7
ATTR_NO_DA = 1 << 10
ATTR_ENCRYPTED_DUPLICATION = 1 << 11
ATTR_RESTRICTED = 1 << 16
ATTR_DECRYPT = 1 << 17
ATTR_SIGN = 1 << 18

#: Persistent handle where Windows (and the TCG provisioning guidance) keeps the SRK.
SRK_HANDLE = Handle.SRK
#: Persistent handle of the RSA EK (TCG EK Credential Profile / provisioning guidance).
EK_HANDLE = Handle.EK


def TPM2B(sub: Any = GreedyBytes) -> Any:
    """A TPM2B: u16 big-endian size, then ``sub`` (raw bytes by default)."""
    return Prefixed(Int16ub, sub)


# --- TPMT_PUBLIC ------------------------------------------------------------------------------
TPMT_SYM_DEF_OBJECT = Struct(
    "algorithm" / Int16ub,
    "keyBits" / If(this.algorithm != ALG_NULL, Int16ub),
    "mode" / If(this.algorithm != ALG_NULL, Int16ub),
)

#: TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME: every scheme we accept carries a hashAlg;
#: ECDAA adds a u16 count.
TPMT_SCHEME = Struct(
    "scheme" / Int16ub,
    "hashAlg" / If(this.scheme != ALG_NULL, Int16ub),
    "count" / If(this.scheme == ALG_ECDAA, Int16ub),
)

TPMT_KEYEDHASH_SCHEME = Struct(
    "scheme" / Int16ub,
    "hashAlg" / If(this.scheme != ALG_NULL, Int16ub),
    "kdf" / If(this.scheme == ALG_XOR, Int16ub),
)

TPMS_RSA_PARMS = Struct(
    "symmetric" / TPMT_SYM_DEF_OBJECT,
    "scheme" / TPMT_SCHEME,
    "keyBits" / Int16ub,
    "exponent" / Int32ub,
)

TPMS_ECC_PARMS = Struct(
    "symmetric" / TPMT_SYM_DEF_OBJECT,
    "scheme" / TPMT_SCHEME,
    "curveID" / Int16ub,
    "kdf" / TPMT_SCHEME,
)

TPMS_KEYEDHASH_PARMS = Struct("scheme" / TPMT_KEYEDHASH_SCHEME)
TPMS_SYMCIPHER_PARMS = Struct("sym" / TPMT_SYM_DEF_OBJECT)

TPMS_ECC_POINT = Struct("x" / TPM2B(), "y" / TPM2B())

TPMT_PUBLIC = Struct(
    "type" / Int16ub,
    "nameAlg" / Int16ub,
    "objectAttributes" / Int32ub,
    "authPolicy" / TPM2B(),
    "parameters"
    / Switch(
        this.type,
        {
            ALG_RSA: TPMS_RSA_PARMS,
            ALG_ECC: TPMS_ECC_PARMS,
            ALG_KEYEDHASH: TPMS_KEYEDHASH_PARMS,
            ALG_SYMCIPHER: TPMS_SYMCIPHER_PARMS,
        },
        default=Const(b"\xff"),
    ),  # unknown type: fails to parse, reported as a FormatError
    "unique" / Switch(this.type, {ALG_ECC: TPMS_ECC_POINT}, default=TPM2B()),
)

#: TPMT_PUBLIC must fill its TPM2B exactly.
TPM2B_PUBLIC = TPM2B(Struct("publicArea" / TPMT_PUBLIC, Terminated))

# --- sensitive / private ----------------------------------------------------------------------
TPMT_SENSITIVE = Struct(
    "sensitiveType" / Int16ub,
    "authValue" / TPM2B(),
    "seedValue" / TPM2B(),
    "sensitive" / TPM2B(),
)
TPM2B_SENSITIVE = TPM2B(Struct("sensitiveArea" / TPMT_SENSITIVE, Terminated))

#: The body of a duplication TPM2B_PRIVATE without inner wrapper: TPM2B(outerHMAC) || encrypted
#: TPM2B_SENSITIVE.
DUPLICATE_BODY = Struct("outerHMAC" / TPM2B(), "encSensitive" / GreedyBytes)

# --- PCR selection ----------------------------------------------------------------------------
TPMS_PCR_SELECTION = Struct(
    "hash" / Int16ub,
    "pcrSelect" / Prefixed(Int8ub, GreedyBytes),  # sizeofSelect || bitmap
)
TPML_PCR_SELECTION = PrefixedArray(Int32ub, TPMS_PCR_SELECTION)

# --- our offline-sealed vTPM protector payload (docs/formats/vtpm-protector.md) --------------
PROTECTOR_MAGIC = b"TTVTPM"
PROTECTOR_VERSION = 1

VTPM_PROTECTOR = Struct(
    "magic" / Const(PROTECTOR_MAGIC),
    "version" / Int16ub,
    "flags" / Int16ub,
    "parentHandle" / Int32ub,
    "parentName" / TPM2B(),
    "policy" / PrefixedArray(Int8ub, Int32ub),  # command codes, in the order the unsealer runs them
    "pcrSelection" / TPML_PCR_SELECTION,
    "pcrDigest" / TPM2B(),
    "duplicate" / TPM2B(),  # TPM2B_PRIVATE
    "public" / TPM2B(),  # TPM2B_PUBLIC contents (TPMT_PUBLIC)
    "inSymSeed" / TPM2B(),  # TPM2B_ENCRYPTED_SECRET contents
    Terminated,
)

# --- TCG PC Client event log (little-endian) -------------------------------------------------
EV_NO_ACTION = 0x00000003

#: SHA-1 log format (TCG_PCClientPCREvent); also the first entry of a crypto-agile log.
TCG_PCR_EVENT = Struct(
    "pcrIndex" / Int32ul,
    "eventType" / Int32ul,
    "digest" / Bytes(20),
    "event" / Prefixed(Int32ul, GreedyBytes),
)

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"

TCG_EFI_SPEC_ID_EVENT = Struct(
    "signature" / Bytes(16),
    "platformClass" / Int32ul,
    "specVersionMinor" / Int8ub,
    "specVersionMajor" / Int8ub,
    "specErrata" / Int8ub,
    "uintnSize" / Int8ub,
    "algorithms" / PrefixedArray(Int32ul, Struct("algorithmId" / Int16ul, "digestSize" / Int16ul)),
    "vendorInfo" / Prefixed(Int8ub, GreedyBytes),
)

#: TCG_PCR_EVENT2 header fields before the digests; digests depend on the Spec ID sizes and are
#: parsed by eventlog.py from ``TCG_DIGEST_HEADER`` + size.
TCG_PCR_EVENT2_HEAD = Struct("pcrIndex" / Int32ul, "eventType" / Int32ul, "digestCount" / Int32ul)
TCG_DIGEST_ALG = Int16ul
TCG_EVENT_SIZE = Int32ul

STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
STARTUP_LOCALITY_EVENT = Struct("signature" / Const(STARTUP_LOCALITY_SIGNATURE), "locality" / Int8ub)
