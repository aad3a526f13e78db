"""Secret input: passwords come from an environment variable or an interactive prompt, never argv."""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable

from .errors import CredentialError, UsageError


def read_secret(env_var: str | None, prompt: str, confirm: bool = False) -> str:
    """Return a secret from ``$env_var`` (when given) or by prompting on the terminal.

    Raises CredentialError when the variable is unset/empty or no terminal is available.
    """
    if env_var:
        val = os.environ.get(env_var)
        if not val:
            raise CredentialError(f"environment variable {env_var} is not set or empty", hint="export it or omit the option to be prompted")
        return val
    if not sys.stdin.isatty():
        raise UsageError("a secret is needed but no terminal is available", hint="pass it through an environment variable option")
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


__all__ = ["env_or_prompt", "read_secret", "write_secret_file"]
