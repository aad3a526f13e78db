"""CLI side of signer secrets: read ``--password-env`` / ``--pin-env`` / prompt, pass values on."""

from __future__ import annotations

import os

from ..secrets import env_or_prompt
from ..signers import Signer, load_signer
from ..signers.pkcs11_signer import DEFAULT_PIN_ENV, MODULE_ENV


def open_signer(spec: str, password_env: str | None = None, pin_env: str | None = None) -> Signer:
    """Open a signer spec; the password comes from ``$password_env`` or a terminal prompt (asked
    only for an encrypted file), the PKCS#11 PIN from ``$pin_env`` (default
    ``$TEMPLATETOOL_PKCS11_PIN``), the PKCS#11 module (when the URI names none) from
    ``$TEMPLATETOOL_PKCS11_MODULE``. The library receives the values only."""
    target = spec[4:].split(",")[0] if spec.startswith("pem:") else spec
    password = env_or_prompt(password_env, f"password for {os.path.basename(target)}: ")
    pin = env_or_prompt(pin_env or DEFAULT_PIN_ENV, "token PIN: ")
    return load_signer(spec, password=password, pin=pin, pkcs11_module=os.environ.get(MODULE_ENV) or None)
