"""The Windows-made samples are really there in CI, and are the files the tests were written for."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import conftest
from .conftest import require_samples


def test_samples_folder_present_and_checksums_match() -> None:
    """Runs everywhere: in CI a missing folder fails loudly; wherever present, SHA256SUMS must match."""
    d = require_samples()
    sums = d / "SHA256SUMS"
    assert sums.is_file(), f"{sums} missing"
    listed = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            listed[name.lstrip("*")] = digest
    assert len(listed) >= 10, listed  # the BitLocker sample set: 12 volumes and .BEK files
    bad = {n: "missing" if not (d / n).is_file() else "differs" for n, h in listed.items()
           if not (d / n).is_file() or hashlib.sha256((d / n).read_bytes()).hexdigest() != h}
    assert bad == {}, f"samples in {d} do not match SHA256SUMS: {bad}"
    unlisted = sorted(p.name for p in d.iterdir() if p.name not in listed and p.name not in ("SHA256SUMS", "README.md"))
    assert unlisted == [], f"sample files not in SHA256SUMS: {unlisted}"


@pytest.mark.parametrize("ci", [True, False])
def test_missing_samples_fail_in_ci_skip_locally(ci: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "SAMPLES", tmp_path / "no-such-samples")
    monkeypatch.setattr(conftest, "IN_CI", ci)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="samples folder") as ei:
        require_samples()
    assert ei.type is (pytest.fail.Exception if ci else pytest.skip.Exception)


@pytest.mark.parametrize("env,outcome", [({"CI": "true"}, "1 failed")])
def test_ci_run_without_samples_fails(env: dict[str, str], outcome: str, tmp_path: Path) -> None:
    """End to end: a pytest run with CI set and no samples folder fails (locally it skips)."""
    e = {k: v for k, v in os.environ.items() if k not in ("CI", "TEMPLATETOOL_CI")}
    e.update(env, TEMPLATETOOL_SAMPLES=str(tmp_path / "absent"))
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "tests/test_samples_present.py::test_samples_folder_present_and_checksums_match"],
                        cwd=str(conftest.ROOT), env=e, capture_output=True, text=True)
    assert outcome in cp.stdout, cp.stdout[-2000:]
    assert cp.returncode == (1 if "failed" in outcome else 0), cp.stdout[-2000:]
