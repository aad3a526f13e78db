"""templatetool: offline shielded-VM template, BitLocker and VHDX tooling.

Importing the package changes nothing in the process (no environment variables, no threads).
numpy's bundled OpenBLAS may start idle threads at import; it stops them itself before every
fork (its own ``pthread_atfork`` handler), and we never call BLAS, so the parallel engine's
workers are forked from a single-threaded process (tests/test_engine.py checks the OS count).
The CLI, which owns its process, sets ``OPENBLAS_NUM_THREADS=1`` before numpy is imported.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public API (docs/api.md), loaded on first use so that ``import templatetool.X`` stays light.
if TYPE_CHECKING:
    from .api import (
        CatalogExport,
        CatalogVerification,
        Decrypted,
        DiskDescription,
        DiskVolume,
        Encrypted,
        EncryptedInPlace,
        EncryptKeys,
        EscrowContents,
        GuardianCreated,
        PdkCreated,
        PreflightProblem,
        PreflightReport,
        Protected,
        Shielded,
        UnlockResult,
        UnlockStep,
        decrypt,
        dry_run,
        encrypt,
        encrypt_in_place,
        export_vsc,
        inspect,
        new_guardian,
        new_pdk,
        open_escrow,
        open_guardian,
        open_signer,
        preflight,
        protect,
        resume,
        shield,
        unlock,
        verify_vsc,
    )
    from .errors import (
        CredentialError,
        FormatError,
        IntegrityError,
        NotFoundError,
        PolicyError,
        ResourceError,
        TemplateToolError,
        UnsupportedError,
        UsageError,
    )
    from .signers import (
        KeyAlgorithm,
        KeySigner,
        PemSigner,
        PfxSigner,
        Pkcs11Signer,
        Secret,
        SecretSource,
        Signer,
    )

_LAZY = {
    **dict.fromkeys(
        (
            "CatalogExport",
            "CatalogVerification",
            "Decrypted",
            "DiskDescription",
            "DiskVolume",
            "EncryptKeys",
            "Encrypted",
            "EncryptedInPlace",
            "EscrowContents",
            "GuardianCreated",
            "PdkCreated",
            "PreflightProblem",
            "PreflightReport",
            "Protected",
            "Shielded",
            "UnlockResult",
            "UnlockStep",
            "decrypt",
            "dry_run",
            "encrypt",
            "encrypt_in_place",
            "export_vsc",
            "inspect",
            "new_guardian",
            "new_pdk",
            "open_escrow",
            "open_guardian",
            "open_signer",
            "preflight",
            "protect",
            "resume",
            "shield",
            "unlock",
            "verify_vsc",
        ),
        "api",
    ),
    **dict.fromkeys(
        (
            "CredentialError",
            "FormatError",
            "IntegrityError",
            "NotFoundError",
            "PolicyError",
            "ResourceError",
            "TemplateToolError",
            "UnsupportedError",
            "UsageError",
        ),
        "errors",
    ),
    **dict.fromkeys(
        (
            "KeyAlgorithm",
            "KeySigner",
            "PemSigner",
            "PfxSigner",
            "Pkcs11Signer",
            "Secret",
            "SecretSource",
            "Signer",
        ),
        "signers",
    ),
}

__all__ = [
    "CatalogExport",
    "CatalogVerification",
    "CredentialError",
    "Decrypted",
    "DiskDescription",
    "DiskVolume",
    "EncryptKeys",
    "Encrypted",
    "EncryptedInPlace",
    "EscrowContents",
    "FormatError",
    "GuardianCreated",
    "IntegrityError",
    "KeyAlgorithm",
    "KeySigner",
    "NotFoundError",
    "PdkCreated",
    "PemSigner",
    "PfxSigner",
    "Pkcs11Signer",
    "PolicyError",
    "PreflightProblem",
    "PreflightReport",
    "Protected",
    "ResourceError",
    "Secret",
    "SecretSource",
    "Shielded",
    "Signer",
    "TemplateToolError",
    "UnlockResult",
    "UnlockStep",
    "UnsupportedError",
    "UsageError",
    "__version__",
    "decrypt",
    "dry_run",
    "encrypt",
    "encrypt_in_place",
    "export_vsc",
    "inspect",
    "new_guardian",
    "new_pdk",
    "open_escrow",
    "open_guardian",
    "open_signer",
    "preflight",
    "protect",
    "resume",
    "shield",
    "unlock",
    "verify_vsc",
]


def __getattr__(name: str) -> object:
    """Lazy re-exports: ``from templatetool import protect, Signer, UsageError``."""
    import importlib

    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
