"""The fabric's vTPM state ledger: which vTPM state of each VM is the latest, so an older copy of
``VM.vtpm`` (a restored backup, a second host running a fork of the VM) gets no key.

A VM's vTPM state changes every time it runs (swtpm writes its NV, counters, the dictionary-attack
lockout); the HMAC under K (docs/formats/vtpm-state.md) proves a state was made by someone holding
K, not that it is the newest. The key protection service is the one party every start goes
through, so it keeps, per VM, the SHA-256 of the latest state:

* the VM is named by ``vm_id`` = SHA-256(``"templatetool vm-id v1\\0"`` || K): stable across
  ``kp grant``/``kp revoke`` (the secret does not change), and it reveals nothing of K;
* a release (RollTransportKey) for a VM secret that carries K must name the state the host will
  boot (``VtpmStateSha256``); it must equal the ledger's latest, or — before the first report —
  the state shield wrote (the secret's ``vtpm_state_sha256``); otherwise no key;
* when the VM stops the host reports the new state: (previous, current) and
  ``mac`` = HMAC-SHA256(K, ``"templatetool vtpm-state v1\\0"`` || vm_id || previous || current).
  Only a holder of K (a host that got a release) can make it; the ledger advances only from its
  latest (compare-and-swap), so of two forks only one can ever report.

docs/formats/hgs-service.md has the wire form and the crash-safe order the host follows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

from ..errors import FormatError

VM_SECRET_FORMAT = "templatetool-vm-secret"
_ID_LABEL = b"templatetool vm-id v1\0"
_MAC_LABEL = b"templatetool vtpm-state v1\0"
#: The error code of a refused state (a rollback or a fork); the KPS fault VtpmStateException.
STATE_CODE = "hgs.vtpm-state"


@dataclass(frozen=True)
class VmStateKeys:
    """What the ledger needs from a VM secret: K and the state shield wrote."""

    key: bytes
    initial_sha256: str

    @property
    def vm_id(self) -> str:
        """The VM's name in the ledger (hex)."""
        return vm_id(self.key)


def vm_id(key: bytes) -> str:
    """SHA-256(label || K), hex: the VM's ledger name."""
    return hashlib.sha256(_ID_LABEL + key).hexdigest()


def vm_state_keys(secret: bytes) -> VmStateKeys | None:
    """K and the initial state hash of a version 2 VM secret with a manufactured vTPM; None for any
    other secret (a software-vTPM VM, or a secret that is not a VM secret: nothing to track)."""
    try:
        d = json.loads(secret)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or d.get("format") != VM_SECRET_FORMAT or d.get("version") != 2:
        return None
    k, digest = d.get("vtpm_state_key"), d.get("vtpm_state_sha256")
    if k is None:
        return None
    try:
        key = base64.b64decode(k, validate=True)
        if len(key) != 32 or not isinstance(digest, str) or len(bytes.fromhex(digest)) != 32:
            raise ValueError
    except (ValueError, TypeError, binascii.Error):
        raise FormatError("the VM secret's vTPM state key or hash is malformed", "key protector") from None
    return VmStateKeys(key, digest.lower())


def state_mac(key: bytes, vm: str, previous: str, current: str) -> str:
    """HMAC-SHA256 under K over the ledger step ``previous`` → ``current`` (hex digests), hex."""
    msg = _MAC_LABEL + bytes.fromhex(vm) + bytes.fromhex(previous) + bytes.fromhex(current)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def check_digest(text: object, what: str, where: str) -> str:
    """A lower-case 64-hex-digit SHA-256, or FormatError."""
    if not isinstance(text, str) or len(text) != 64:
        raise FormatError(f"{what} must be a SHA-256 in hex (64 digits)", where)
    try:
        bytes.fromhex(text)
    except ValueError:
        raise FormatError(f"{what} must be a SHA-256 in hex (64 digits)", where) from None
    return text.lower()


__all__ = ["STATE_CODE", "VmStateKeys", "check_digest", "state_mac", "vm_id", "vm_state_keys"]
