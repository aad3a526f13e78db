"""The tutorials run as written: every ```sh block of docs/tutorial-*.md, top to bottom, in one
shell, in a fresh folder. ``templatetool`` resolves to this source tree's CLI (what
``source .venv/bin/activate`` gives a reader); ``TEMPLATETOOL_SRC`` is the checkout, where the
tutorials take the lab golden disk from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import ROOT, require_tool

DOCS = ROOT / "docs"
TUTORIALS = sorted(p.name for p in DOCS.glob("tutorial-*.md"))
BLOCK = re.compile(r"^[ \t]*```sh\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
#: external tools the tutorials call, per tutorial
TOOLS = {"tutorial-template-author.md": ("openssl", "softhsm2-util"),
         "tutorial-tenant.md": ("openssl", "xmlsec1"),
         "tutorial-pipeline.md": ("softhsm2-util", "openssl")}
SOFTHSM = ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"]


def sh_blocks(name: str) -> list[str]:
    """The ```sh blocks of a tutorial, in order."""
    return [textwrap.dedent(b) for b in BLOCK.findall((DOCS / name).read_text())]


def test_every_tutorial_has_runnable_blocks() -> None:
    assert TUTORIALS, "no docs/tutorial-*.md"
    for name in TUTORIALS:
        assert len(sh_blocks(name)) >= 3, name
        # a fenced block that is neither sh (runs) nor text/toml/xml (shown) would silently not run
        for fence in re.findall(r"^[ \t]*```(\S*)[ \t]*$", (DOCS / name).read_text(), re.M):
            assert fence in ("", "sh", "text", "toml", "xml", "json"), (name, fence)


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs_as_written(name: str, tmp_path: Path) -> None:
    require_tool("bash", *TOOLS.get(name, ()))
    if "softhsm2-util" in TOOLS.get(name, ()) and not any(os.path.exists(p) for p in SOFTHSM):
        require_tool("libsofthsm2.so")
    work = tmp_path / "work"
    work.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "templatetool"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m templatetool.cli.main "$@"\n')
    shim.chmod(0o755)
    blocks = sh_blocks(name)
    assert blocks, f"{name} has no sh block to run"
    parts = ["set -euo pipefail"]
    for i, block in enumerate(blocks):
        parts.append(f"echo '@@ block {i + 1}' >&2")
        parts.append(block)
    parts.append("echo '@@ done' >&2")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPLATETOOL_", "SOFTHSM2"))}
    env.update({"PATH": f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", "PYTHONPATH": str(ROOT),
                "TEMPLATETOOL_SRC": str(ROOT), "HOME": str(tmp_path)})
    cp = subprocess.run(["bash", "-c", "\n".join(parts)], cwd=work, env=env, capture_output=True, text=True,
                        timeout=240)
    markers = [ln for ln in cp.stderr.splitlines() if ln.startswith("@@ ")]
    last = markers[-1] if markers else "@@ (none)"
    assert cp.returncode == 0 and last == "@@ done", (
        f"{name}: {last[3:]} failed (exit {cp.returncode})\n--- stdout\n{cp.stdout[-3000:]}\n"
        f"--- stderr\n{cp.stderr[-3000:]}")
    # the tutorials never write into the source tree
    assert not (ROOT / "golden.vhdx").exists()
    shutil.rmtree(work, ignore_errors=True)
