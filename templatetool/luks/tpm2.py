"""The ``systemd-tpm2`` LUKS2 token: a secret sealed in a (v)TPM under systemd 252's primary key
with a PolicyPCR policy, and the keyslot whose passphrase is that secret in base64.

What systemd 252 expects (measured here against systemd-cryptenroll 252 and its token plugin,
docs/formats/luks2.md):

* the parent is a *transient* primary in the owner hierarchy, re-created on every unlock from a
  fixed template: ECC NIST P-256 (``tpm2-primary-alg: "ecc"``; RSA-2048 is the fallback),
  nameAlg SHA-256, AES-128-CFB, attributes fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
  restricted|decrypt — *without* noDA (an object sealed under the TCG SRK template, which has
  noDA, does not load under systemd's primary);
* the sealed object: KEYEDHASH, nameAlg SHA-256, attributes fixedTPM|fixedParent only (no
  userWithAuth: only the policy opens it), ``authPolicy`` = PolicyPCR over ``tpm2-pcrs`` in
  ``tpm2-pcr-bank``, stored as ``tpm2-policy-hash`` (hex);
* ``tpm2-blob`` = base64(TPM2B_PRIVATE || TPM2B_PUBLIC);
* the keyslot's passphrase is base64 of the unsealed secret (the plugin encodes what it unseals).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import FormatError, IntegrityError, UnsupportedError, UsageError
from ..tpm import tpmclient
from ..tpm.algs import bank_id, bank_name, check_pcrs
from ..tpm.policy import compute_policy
from ..tpm.tpmclient import _Session, _translate, open_tpm
from .kdf import KdfParams
from .volume import KeyslotSpec

#: tpm2-pytss, imported lazily (the offline side never needs the TSS libraries).
_tss: Callable[[], Any] = tpmclient._tss

TOKEN_TYPE = "systemd-tpm2"
#: systemd 252's primary: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt.
SYSTEMD_PRIMARY_ATTRIBUTES = 0x00030072
#: the sealed object's attributes: fixedTPM|fixedParent.
SEALED_ATTRIBUTES = 0x00000012
SECRET_LEN = 32
#: the token keyslot's KDF: the passphrase is a 256-bit random secret, so a slow KDF adds nothing
#: (systemd-cryptenroll uses PBKDF2 with 1000 iterations for the same reason).
TOKEN_KDF = KdfParams("pbkdf2", hash="sha512", iterations=1000)
PRIMARY_ALGS = ("ecc", "rsa")


def _primary_template(t: Any, alg: str) -> Any:
    if alg not in PRIMARY_ALGS:
        raise UnsupportedError(f"TPM2 primary algorithm {alg!r} is not supported", hint="ecc or rsa")
    spec = "ecc256:aes128cfb" if alg == "ecc" else "rsa2048:aes128cfb"
    return t.TPM2B_PUBLIC.parse(spec, objectAttributes=SYSTEMD_PRIMARY_ATTRIBUTES, nameAlg="sha256")


def _salted_session(t: Any, esys: Any, sess: _Session, primary: Any) -> Any:
    """An HMAC session salted to the primary with AES-128-CFB parameter encryption both ways, so
    the secret never crosses the TPM interface in clear."""
    h = sess.track(
        esys.start_auth_session(
            primary,
            t.ESYS_TR.NONE,
            t.TPM2_SE.HMAC,
            t.TPMT_SYM_DEF(
                algorithm=t.TPM2_ALG.AES, keyBits=t.TPMU_SYM_KEY_BITS(aes=128), mode=t.TPMU_SYM_MODE(aes=t.TPM2_ALG.CFB)
            ),
            t.TPM2_ALG.SHA256,
        )
    )
    esys.trsess_set_attributes(h, t.TPMA_SESSION.DECRYPT | t.TPMA_SESSION.ENCRYPT | t.TPMA_SESSION.CONTINUESESSION)
    return h


def seal_token(
    tcti: str,
    pcrs: Sequence[int] = (7,),
    bank: str = "sha256",
    primary_alg: str = "ecc",
    pcr_values: dict[int, bytes] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Seal a fresh secret in the TPM at ``tcti``; returns (secret, token object without
    ``keyslots``). PCR values are the TPM's current ones unless ``pcr_values`` are given."""
    t = _tss()
    pcr_list = check_pcrs(dict.fromkeys(pcrs, b""))
    if not pcr_list:
        raise FormatError("no PCRs selected for the systemd-tpm2 token")
    esys = open_tpm(tcti)
    sess = _Session(esys)
    stage = "primary"
    try:
        primary = sess.track(
            esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), _primary_template(t, primary_alg), t.ESYS_TR.OWNER)[0]
        )
        if pcr_values is None:
            stage = "read PCRs"
            sel = t.TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcr_list))}")
            _, _sel, digests = esys.pcr_read(sel)
            vals = [bytes(d) for d in digests]
            if len(vals) != len(pcr_list):
                raise UnsupportedError(f"the TPM has no {bank} bank with PCRs {pcr_list}")
            pcr_values = dict(zip(pcr_list, vals, strict=True))
        policy = compute_policy(bank, pcr_values)
        secret = os.urandom(SECRET_LEN)
        stage = "create"
        enc = _salted_session(t, esys, sess, primary)
        tmpl = t.TPM2B_PUBLIC(
            t.TPMT_PUBLIC(
                type=t.TPM2_ALG.KEYEDHASH,
                nameAlg=t.TPM2_ALG.SHA256,
                objectAttributes=SEALED_ATTRIBUTES,
                authPolicy=policy.digest,
            )
        )
        tmpl.publicArea.parameters.keyedHashDetail.scheme.scheme = t.TPM2_ALG.NULL
        sens = t.TPM2B_SENSITIVE_CREATE(t.TPMS_SENSITIVE_CREATE(data=t.TPM2B_SENSITIVE_DATA(secret)))
        priv, pub, *_ = esys.create(primary, sens, tmpl, session1=enc)
        blob = bytes(priv.marshal()) + bytes(pub.marshal())
    except t.TSS2_Exception as e:
        raise _translate(e, stage) from None
    finally:
        sess.close()
    token = {
        "type": TOKEN_TYPE,
        "keyslots": [],
        "tpm2-blob": base64.b64encode(blob).decode(),
        "tpm2-pcrs": list(pcr_list),
        "tpm2-pcr-bank": bank_name(bank_id(bank)),
        "tpm2-primary-alg": primary_alg,
        "tpm2-policy-hash": policy.digest.hex(),
        "tpm2-pin": False,
    }
    return secret, token


def token_passphrase(secret: bytes) -> bytes:
    """The token keyslot's passphrase: base64 of the sealed secret."""
    return base64.b64encode(secret)


def token_keyslot(
    tcti: str,
    pcrs: Sequence[int] = (7,),
    bank: str = "sha256",
    primary_alg: str = "ecc",
    pcr_values: dict[int, bytes] | None = None,
) -> KeyslotSpec:
    """A keyslot spec (passphrase + bound token) sealed in the TPM at ``tcti``; ``pcr_values``
    (e.g. replayed from the VM's TCG log) instead of the TPM's current PCRs."""
    if pcr_values is not None and sorted(pcr_values) != sorted(set(pcrs)):
        raise UsageError(
            f"PCR values are given for {sorted(pcr_values)}, the token is sealed to {sorted(set(pcrs))}",
            hint="give a value for every PCR the token is sealed to",
            code="luks.pcr-values",
        )
    secret, token = seal_token(tcti, pcrs, bank, primary_alg, pcr_values)
    return KeyslotSpec(token_passphrase(secret), TOKEN_KDF, token=token, af_hash="sha512")


def _blob(token: dict[str, Any]) -> tuple[bytes, bytes]:
    t = _tss()
    try:
        raw = base64.b64decode(str(token.get("tpm2-blob")), validate=True)
        _, n = t.TPM2B_PRIVATE.unmarshal(raw)
        _, m = t.TPM2B_PUBLIC.unmarshal(raw[n:])
    except (binascii.Error, ValueError, t.TSS2_Exception):
        raise FormatError("the systemd-tpm2 token's tpm2-blob is not TPM2B_PRIVATE || TPM2B_PUBLIC") from None
    if n + m != len(raw):
        raise FormatError("the systemd-tpm2 token's tpm2-blob has trailing bytes")
    return raw[:n], raw[n:]


def unseal_token(tcti: str, token: dict[str, Any]) -> bytes:
    """Our own unseal of a ``systemd-tpm2`` token (no PIN): the keyslot passphrase."""
    t = _tss()
    if token.get("type") != TOKEN_TYPE:
        raise FormatError(f"not a {TOKEN_TYPE} token")
    if token.get("tpm2-pin"):
        raise UnsupportedError("systemd-tpm2 tokens with a PIN are not supported")
    priv_b, pub_b = _blob(token)
    pcrs = token.get("tpm2-pcrs")
    if not isinstance(pcrs, list) or not all(isinstance(p, int) for p in pcrs):
        raise FormatError("the systemd-tpm2 token's tpm2-pcrs is not a list of numbers")
    bank = str(token.get("tpm2-pcr-bank", "sha256"))
    esys = open_tpm(tcti)
    sess = _Session(esys)
    stage = "primary"
    try:
        primary = sess.track(
            esys.create_primary(
                t.TPM2B_SENSITIVE_CREATE(),
                _primary_template(t, str(token.get("tpm2-primary-alg", "ecc"))),
                t.ESYS_TR.OWNER,
            )[0]
        )
        stage = "load"
        obj = sess.track(esys.load(primary, t.TPM2B_PRIVATE.unmarshal(priv_b)[0], t.TPM2B_PUBLIC.unmarshal(pub_b)[0]))
        stage = "policy"
        ps = sess.track(
            esys.start_auth_session(
                primary,
                t.ESYS_TR.NONE,
                t.TPM2_SE.POLICY,
                t.TPMT_SYM_DEF(
                    algorithm=t.TPM2_ALG.AES,
                    keyBits=t.TPMU_SYM_KEY_BITS(aes=128),
                    mode=t.TPMU_SYM_MODE(aes=t.TPM2_ALG.CFB),
                ),
                t.TPM2_ALG.SHA256,
            )
        )
        esys.trsess_set_attributes(ps, t.TPMA_SESSION.ENCRYPT | t.TPMA_SESSION.CONTINUESESSION)
        esys.policy_pcr(ps, t.TPM2B_DIGEST(), t.TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}"))
        if bytes(esys.policy_get_digest(ps)).hex() != str(token.get("tpm2-policy-hash", "")).lower():
            raise IntegrityError(
                "the PCRs no longer match the systemd-tpm2 token's policy",
                hint="the boot chain changed since the key was sealed",
            )
        stage = "unseal"
        return token_passphrase(bytes(esys.unseal(obj, session1=ps)))
    except t.TSS2_Exception as e:
        raise _translate(e, stage) from None
    finally:
        sess.close()


def tokens_of(metadata: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ``systemd-tpm2`` tokens of a LUKS2 header's metadata, in token order."""
    toks = metadata.get("tokens") or {}
    return [
        (k, v)
        for k, v in sorted(toks.items(), key=lambda kv: int(kv[0]))
        if isinstance(v, dict) and v.get("type") == TOKEN_TYPE
    ]


__all__ = [
    "SEALED_ATTRIBUTES",
    "SYSTEMD_PRIMARY_ATTRIBUTES",
    "TOKEN_TYPE",
    "seal_token",
    "token_keyslot",
    "token_passphrase",
    "tokens_of",
    "unseal_token",
]
