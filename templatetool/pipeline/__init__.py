"""templatetool.pipeline: the multi-step jobs (protect, encrypt/decrypt, shield, unlock, build, demo).

Users call them through :mod:`templatetool.api`, which returns typed results; the entry points
below are the building blocks it wraps (loaded on first use).
"""

from __future__ import annotations

_LAZY = {
    "preflight": "protect",
    "protect": "protect",
    "encrypt_disk": "encrypt",
    "decrypt_disk": "encrypt",
    "Credentials": "encrypt",
    "shield": "shield",
    "unlock": "unlock",
    "describe_disk": "inspect",
    "run_build": "build",
    "Recipe": "build",
    "run_demo": "demo",
}

__all__ = [
    "Credentials",
    "Recipe",
    "decrypt_disk",
    "describe_disk",
    "encrypt_disk",
    "preflight",
    "protect",
    "run_build",
    "run_demo",
    "shield",
    "unlock",
]


def __getattr__(name: str) -> object:
    """Lazy re-exports (``from templatetool.pipeline import protect``)."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
