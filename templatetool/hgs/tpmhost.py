"""Host side of TPM quote attestation, on a real TPM or swtpm through tpm2-pytss.

The host's EK (standard RSA-2048 EK template, authPolicy PolicySecret(endorsement)) and an AK
(a restricted RSA-2048 RSASSA-SHA256 signing primary in the owner hierarchy; both primaries are
re-derived from the TPM's seeds, so they are the same on every run) answer the service's
challenge: ActivateCredential recovers the credential the service made for this EK and AK Name,
and TPM2_Quote signs the PCRs with the service's qualifying data.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import CredentialError, ResourceError
from ..tpm.algs import bank_name
from ..tpm.keys import EK_ATTRIBUTES, EK_POLICY
from ..tpm.tpmclient import open_tpm

#: AK attributes: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign.
AK_ATTRIBUTES = 0x00050072


class TpmHost:
    """A host's TPM: EK and AK handles for one attestation. Use as a context manager."""

    def __init__(self, tcti: str) -> None:
        import tpm2_pytss as t

        self.t = t
        self.esys = open_tpm(tcti)
        self.tcti = tcti
        try:
            tmpl = t.TPM2B_PUBLIC.parse("rsa2048:aes128cfb", objectAttributes=EK_ATTRIBUTES)
            tmpl.publicArea.authPolicy = EK_POLICY
            tmpl.publicArea.unique.rsa = bytes(256)
            self.ek, ekpub, *_ = self.esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, t.ESYS_TR.ENDORSEMENT)
            ak_t = t.TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=AK_ATTRIBUTES)
            self.ak, akpub, *_ = self.esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), ak_t, t.ESYS_TR.OWNER)
        except t.TSS2_Exception as e:
            self.esys.close()
            raise ResourceError(f"the TPM refused to create the EK/AK: {str(e)[:120]}", tcti) from None
        self.ek_public = bytes(ekpub.marshal()[2:])
        self.ak_public = bytes(akpub.marshal()[2:])

    def ek_pem(self) -> str:
        """The EK public key as PEM (what `hgs register-host --ek` registers)."""
        from ..tpm.keys import parse_parent_public
        from .host import pem_public

        return pem_public(parse_parent_public(self.ek_public, "EK").public_key)

    def activate(self, credential_blob: bytes, secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the credential, if the challenge was made for this EK and AK."""
        t = self.t
        ps = self.esys.start_auth_session(
            t.ESYS_TR.NONE,
            t.ESYS_TR.NONE,
            t.TPM2_SE.POLICY,
            t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL),
            t.TPM2_ALG.SHA256,
        )
        try:
            self.esys.policy_secret(t.ESYS_TR.ENDORSEMENT, ps)
            got = self.esys.activate_credential(
                self.ak,
                self.ek,
                t.TPM2B_ID_OBJECT(credential_blob),
                t.TPM2B_ENCRYPTED_SECRET(secret),
                session1=t.ESYS_TR.PASSWORD,
                session2=ps,
            )
        except t.TSS2_Exception as e:
            raise CredentialError(f"the TPM refused the credential challenge: {str(e)[:120]}", self.tcti) from None
        finally:
            self.esys.flush_context(ps)
        return bytes(got)

    def quote(self, qualifying: bytes, pcrs: list[int], bank: int = 0x000B) -> tuple[bytes, bytes]:
        """TPM2_Quote over ``pcrs`` of ``bank`` with ``qualifying`` data: (TPMS_ATTEST, TPMT_SIGNATURE)."""
        t = self.t
        sel = t.TPML_PCR_SELECTION.parse(f"{bank_name(bank)}:" + ",".join(map(str, sorted(pcrs))))
        try:
            quoted, sig = self.esys.quote(self.ak, sel, qualifying, t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL))
        except t.TSS2_Exception as e:
            raise ResourceError(f"TPM2_Quote failed: {str(e)[:120]}", self.tcti) from None
        return bytes(quoted.marshal()[2:]), bytes(sig.marshal())

    def close(self) -> None:
        """Flush the primaries and close the connection."""
        for h in (self.ak, self.ek):
            with contextlib.suppress(Exception):  # best effort: the connection is closed next
                self.esys.flush_context(h)
        self.esys.close()

    def __enter__(self) -> TpmHost:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["AK_ATTRIBUTES", "TpmHost"]
