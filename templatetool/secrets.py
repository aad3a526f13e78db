"""Secrets: the value types the library takes, and the front ends' helpers that obtain them.

The library takes secrets as values: ``bytes``/``str`` or a :data:`SecretSource` (a callable
called only when the secret is needed); used by :mod:`templatetool.signers.base` and the api. Reading an
environment variable or prompting on the terminal (:func:`read_secret`, :func:`env_or_prompt`)
is for front ends only (the CLI, build recipes): never argv, never logs.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable

from .errors import CredentialError, UsageError

#: A secret given as a value, or a callable producing it when (and only if) it is needed.
SecretSource = Callable[[], bytes | str]
Secret = bytes | str | SecretSource


def resolve_secret(secret: Secret | None) -> bytes | None:
    """The secret as UTF-8 bytes (calling a :data:`SecretSource`); None stays None."""
    if secret is None:
        return None
    value = secret() if callable(secret) else secret
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def read_secret(env_var: str | None, prompt: str, confirm: bool = False) -> str:
    """Return a secret from ``$env_var`` (when given) or by prompting on the terminal.

    Raises CredentialError when the variable is unset/empty or no terminal is available.
    """
    if env_var:
        val = os.environ.get(env_var)
        if not val:
            raise CredentialError(
                f"environment variable {env_var} is not set or empty",
                hint="export it or omit the option to be prompted",
            )
        return val
    if not sys.stdin.isatty():
        raise UsageError(
            "a secret is needed but no terminal is available", hint="pass it through an environment variable option"
        )
    val = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != val:
        raise CredentialError("the two entries differ")
    return val


def write_secret_file(path: str, data: bytes) -> None:
    """Write key material atomically with mode 0600."""
    from .atomic import write_bytes_atomic

    write_bytes_atomic(path, data, mode=0o600)


def env_or_prompt(env_var: str | None, prompt: str) -> Callable[[], str]:
    """A lazy secret source for front ends (CLI, build files): ``read_secret(env_var, prompt)``
    is called only when a library object actually needs the secret."""
    return lambda: read_secret(env_var, prompt)


__all__ = ["Secret", "SecretSource", "env_or_prompt", "read_secret", "resolve_secret", "write_secret_file"]
