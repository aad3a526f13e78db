"""The optional C extension: built against OpenSSL's headers, wiping key material for real."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import IN_CI, ROOT, require_tool


def _extension() -> Path:
    from templatetool import native

    if not native.built():
        msg = "templatetool._xts is not built (python setup.py build_ext --inplace)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    from templatetool import _xts

    return Path(_xts.__file__)


def _imports(so: Path) -> set[str]:
    cp = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True)
    return {ln.split()[-1].split("@")[0] for ln in cp.stdout.splitlines() if ln.strip()}


def test_key_wipe_is_openssl_cleanse() -> None:
    """A memset of a dead stack buffer is dropped at -O2; OPENSSL_cleanse must be what wipes."""
    require_tool("nm")
    imports = _imports(_extension())
    assert "OPENSSL_cleanse" in imports, sorted(imports)
    assert {"EVP_CipherInit_ex", "SHA256_Final"} <= imports  # the symbols really came from libcrypto


def test_source_uses_openssl_headers() -> None:
    src = (ROOT / "templatetool" / "_xts.c").read_text()
    assert "#include <openssl/evp.h>" in src and "#include <openssl/crypto.h>" in src
    # no hand-declared OpenSSL types or opaque context buffers
    for decl in ("typedef struct evp_cipher_ctx_st", "SHA256_CTX_BUF", "opaque["):
        assert decl not in src, decl
