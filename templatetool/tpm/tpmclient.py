"""Talk to a real (v)TPM through tpm2-pytss ESAPI: find the parent, Import, Load, run the policy,
Unseal. Imported lazily: the offline side never needs the TSS libraries."""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any

from ..errors import CredentialError, IntegrityError, NotFoundError, PolicyError, ResourceError, UnsupportedError
from . import structs as s

# TPM response codes we translate (format-1 codes are compared without their parameter/session bits).
_RC_POLICY_FAIL = 0x09D
_RC_AUTH_FAIL = 0x08E
_RC_BAD_AUTH = 0x0A2
_RC_INTEGRITY = 0x09F
_RC_LOCKOUT = 0x921
_RC_HANDLE = 0x08B


def _tss() -> ModuleType:  # tpm2_pytss (untyped; attributes are Any)
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # expected TPM errors must not spam stderr
    try:
        import tpm2_pytss
    except ImportError as e:
        raise ResourceError(
            f"tpm2-pytss is not available: {e}", hint="pip install 'templatetool[tpm]' (needs libtss2)"
        ) from None
    t: ModuleType = tpm2_pytss
    return t


def _base_rc(rc: int) -> int:
    rc &= 0xFFFF
    return rc & 0xBF if rc & 0x80 else rc


def open_tpm(tcti: str) -> Any:
    """An ESAPI context for a TCTI string such as ``swtpm:host=127.0.0.1,port=2321``."""
    t = _tss()
    try:
        return t.ESAPI(t.TCTILdr.parse(tcti))
    except Exception as e:
        raise ResourceError(
            f"cannot connect to the TPM: {str(e)[:120]}",
            tcti,
            "check the TCTI string (e.g. swtpm:host=127.0.0.1,port=2321, device:/dev/tpmrm0)",
        ) from None


def _standard_templates(t: Any) -> list[tuple[Any, Any]]:
    """(hierarchy, TPM2B_PUBLIC template) of the standard SRKs and EKs (RSA-2048, ECC P-256)."""
    from .keys import EK_ATTRIBUTES, EK_POLICY, SRK_ATTRIBUTES

    out = []
    for hier, attrs, policy in (
        (t.ESYS_TR.OWNER, SRK_ATTRIBUTES, b""),
        (t.ESYS_TR.ENDORSEMENT, EK_ATTRIBUTES, EK_POLICY),
    ):
        for alg in ("rsa2048:aes128cfb", "ecc256:aes128cfb"):
            tmpl = t.TPM2B_PUBLIC.parse(alg, objectAttributes=attrs)
            tmpl.publicArea.authPolicy = policy
            if alg.startswith("rsa"):
                tmpl.publicArea.unique.rsa = bytes(256) if hier == t.ESYS_TR.ENDORSEMENT else b""
            elif hier == t.ESYS_TR.ENDORSEMENT:
                tmpl.publicArea.unique.ecc.x = bytes(32)
                tmpl.publicArea.unique.ecc.y = bytes(32)
            out.append((hier, tmpl))
    return out


class _Session:
    """Handles to flush when done."""

    def __init__(self, esys: Any) -> None:
        self.esys = esys
        self.handles: list[Any] = []

    def track(self, h: Any) -> Any:
        self.handles.append(h)
        return h

    def close(self) -> None:
        for h in reversed(self.handles):
            with contextlib.suppress(Exception):  # best-effort cleanup; the TPM error that got us here wins
                self.esys.flush_context(h)
        self.esys.close()


def find_parent(esys: Any, sess: _Session, parent_name: bytes, handles: list[int]) -> Any:
    """An ESYS_TR for the parent whose Name is ``parent_name``: a persistent handle, else a
    re-created standard SRK/EK primary (deterministic for a given TPM)."""
    t = _tss()
    for h in handles:
        try:
            tr = esys.tr_from_tpmpublic(h)
        except t.TSS2_Exception:
            continue
        if bytes(esys.tr_get_name(tr)) == parent_name:
            return tr
        esys.tr_close(tr)
    for hier, tmpl in _standard_templates(t):
        try:
            h, _pub, *_ = esys.create_primary(t.TPM2B_SENSITIVE_CREATE(), tmpl, hier)
        except t.TSS2_Exception:
            continue
        if bytes(esys.tr_get_name(h)) == parent_name:
            return sess.track(h)
        esys.flush_context(h)
    raise NotFoundError(
        "the protector's parent key is not in this TPM",
        f"parent Name {parent_name.hex()[:24]}...",
        "was the blob sealed to this vTPM's SRK/EK? give its persistent handle (parent_handle)",
        code="tpm.parent-handle",
    )


def _policy_session(esys: Any, sess: _Session) -> Any:
    """Start an unsalted, unbound SHA-256 policy session, flushed with ``sess``."""
    t = _tss()
    return sess.track(
        esys.start_auth_session(
            t.ESYS_TR.NONE,
            t.ESYS_TR.NONE,
            t.TPM2_SE.POLICY,
            t.TPMT_SYM_DEF(algorithm=t.TPM2_ALG.NULL),
            t.TPM2_ALG.SHA256,
        )
    )


def _parent_auth_session(esys: Any, sess: _Session, parent: Any) -> Any:
    """Authorisation for the parent: password for an SRK; PolicySecret(endorsement) for an EK."""
    t = _tss()
    pub, *_ = esys.read_public(parent)
    if pub.publicArea.objectAttributes & t.TPMA_OBJECT.USERWITHAUTH:
        return t.ESYS_TR.PASSWORD
    ps = _policy_session(esys, sess)
    esys.policy_secret(t.ESYS_TR.ENDORSEMENT, ps)
    return ps


def unseal_protector(
    prot: Any, tcti: str, *, pin_auth: bytes | None = None, parent_handle: int | None = None, esys: Any = None
) -> bytes:
    """Import → Load → policy session (recorded order) → Unseal. ``esys`` reuses an open context."""
    t = _tss()
    own = esys is None
    esys = open_tpm(tcti) if own else esys
    sess = _Session(esys)
    stage = "connect"
    try:
        if parent_handle is not None:
            handles = [parent_handle]
        else:  # the recorded handle, then the standard SRK / EK handles
            handles = list(dict.fromkeys([prot.parent_handle, s.SRK_HANDLE, s.EK_HANDLE]))
        stage = "find parent"
        parent = find_parent(esys, sess, prot.parent_name, handles)
        pub = t.TPM2B_PUBLIC.unmarshal(prot.blob.tpm2b_public())[0]
        stage = "import"
        auth = _parent_auth_session(esys, sess, parent)
        priv = esys.import_(
            parent,
            t.TPM2B_DATA(),
            pub,
            t.TPM2B_PRIVATE.unmarshal(prot.blob.tpm2b_private())[0],
            t.TPM2B_ENCRYPTED_SECRET.unmarshal(prot.blob.tpm2b_encrypted_secret())[0],
            t.TPMT_SYM_DEF_OBJECT(algorithm=t.TPM2_ALG.NULL),
            session1=auth,
        )
        stage = "load"
        if auth != t.ESYS_TR.PASSWORD:
            esys.flush_context(auth)
            sess.handles.remove(auth)
            auth = _parent_auth_session(esys, sess, parent)
        obj = sess.track(esys.load(parent, priv, pub, session1=auth))
        stage = "policy"
        ps = _policy_session(esys, sess)
        sel = t.TPML_PCR_SELECTION.unmarshal(prot.selection)[0]
        for cc in prot.commands:
            if cc == s.CC_POLICY_PCR:
                esys.policy_pcr(ps, t.TPM2B_DIGEST(), sel)
            elif cc == s.CC_POLICY_AUTH_VALUE:
                esys.policy_auth_value(ps)
            else:
                raise UnsupportedError(f"policy command 0x{cc:x}")
        if s.CC_POLICY_AUTH_VALUE in prot.commands:
            if pin_auth is None:
                raise CredentialError("this protector needs a PIN", hint="give the PIN", code="tpm.pin-needed")
            esys.tr_set_auth(obj, pin_auth)
        stage = "unseal"
        return bytes(esys.unseal(obj, session1=ps))
    except t.TSS2_Exception as e:
        err = _translate(e, stage)
        if stage == "unseal" and _is_wrong_auth(int(e.rc)):
            err = _with_da_status(esys, err)
        raise err from None
    finally:
        if own:
            sess.close()
        else:
            for h in reversed(sess.handles):
                with contextlib.suppress(Exception):  # best-effort cleanup of transient handles
                    esys.flush_context(h)


def _translate(e: Any, stage: str) -> Exception:
    rc = int(e.rc)
    base = _base_rc(rc)
    code = f"TPM rc 0x{rc:x}"
    if rc & 0xFFFF == _RC_LOCKOUT:
        return CredentialError(f"the TPM is in dictionary-attack lockout ({code})", stage, "wait or reset the lockout")
    if stage == "unseal" and base == _RC_POLICY_FAIL:
        return PolicyError(f"the TPM refused: PCR values differ from the sealed ones ({code})", stage)
    if base in (_RC_AUTH_FAIL, _RC_BAD_AUTH):
        return CredentialError(f"wrong PIN ({code})", stage)
    if stage in ("import", "load"):
        return IntegrityError(
            f"the TPM rejected the sealed blob ({code})", stage, "the blob is damaged or sealed to another parent"
        )
    return ResourceError(f"TPM command failed ({code}: {str(e)[:80]})", stage)


def _is_wrong_auth(rc: int) -> bool:
    """A refused authValue (counted by DA protection), not a lockout refusal."""
    return rc & 0xFFFF != _RC_LOCKOUT and _base_rc(rc) in (_RC_AUTH_FAIL, _RC_BAD_AUTH)


def _with_da_status(esys: Any, err: Exception) -> Exception:
    """``err`` with the TPM's dictionary-attack state added (failed tries so far / the limit), so
    that a refused PIN tells how close the TPM is to lockout. Best effort: ``err`` unchanged when
    the TPM does not answer."""
    try:
        count, limit = da_status(esys)
    except Exception:
        return err
    if not isinstance(err, CredentialError):
        return err
    state = f"the TPM counted it: {count} of {limit} failed authorisations before lockout"
    if limit and count >= limit:
        state = f"the TPM counted it ({count} of {limit}) and is now in dictionary-attack lockout"
    return CredentialError(f"{err.what}; {state}", err.where, err.hint or "check the PIN; do not retry blindly")


def da_status(esys: Any) -> tuple[int, int]:
    """(TPM_PT_LOCKOUT_COUNTER, TPM_PT_MAX_AUTH_FAIL): failed authorisations counted towards
    dictionary-attack lockout, and the count at which the TPM locks out."""
    t = _tss()
    _, caps = esys.get_capability(t.TPM2_CAP.TPM_PROPERTIES, t.TPM2_PT.LOCKOUT_COUNTER, 2)
    vals = {int(p.property): int(p.value) for p in caps.data.tpmProperties}
    return vals.get(int(t.TPM2_PT.LOCKOUT_COUNTER), 0), vals.get(int(t.TPM2_PT.MAX_AUTH_FAIL), 0)


def lockout_counter(esys: Any) -> int:
    """TPM_PT_LOCKOUT_COUNTER (failed authorisations counted towards DA lockout)."""
    t = _tss()
    _, caps = esys.get_capability(t.TPM2_CAP.TPM_PROPERTIES, t.TPM2_PT.LOCKOUT_COUNTER, 1)
    for p in caps.data.tpmProperties:
        if p.property == t.TPM2_PT.LOCKOUT_COUNTER:
            return int(p.value)
    return 0
