"""Event-driven kill points: run the real CLI, pausing at every progress step and output rename.

``python -m tests.killpoints ARGS...`` is ``python -m templatetool.cli.main ARGS...`` plus a
hand-shake with the test that started it (``TT_KILLPOINT_FDS=EV,ACK``, two inherited pipe ends):
before each event — a progress bar's ``update`` (bytes done so far) and each ``os.replace`` that
moves a finished output into place — the CLI process writes one line ``<kind> <what> <n>`` to
``EV`` and waits for one byte on ``ACK``. The test answers, or SIGKILLs the process while it
waits, so a kill lands exactly at event *k* whatever the machine's load (no wall clock).

Only the CLI process itself reports: forked workers and helpers (another PID) run untouched.
Nothing here changes what the command computes or writes.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

ENV = "TT_KILLPOINT_FDS"


def install(ev_fd: int, ack_fd: int) -> None:
    """Patch templatetool.progress.progress and os.replace to report and wait (this process only)."""
    import templatetool.progress as progress_mod

    owner = os.getpid()

    def event(line: str) -> None:
        if os.getpid() != owner:
            return
        os.write(ev_fd, (line.replace("\n", " ") + "\n").encode())
        if os.read(ack_fd, 1) != b"g":  # the test is gone: stop rather than run unobserved
            os._exit(99)

    real_progress = progress_mod.progress

    def progress(total: int | None, desc: str, unit: str = "B", **kw: Any):  # type: ignore[no-untyped-def]
        bar = real_progress(total, desc, unit, **kw)
        real_update = bar.update
        done = [0]

        def update(n: float = 1) -> Any:
            r = real_update(n)
            done[0] += int(n)
            event(f"progress {desc.replace(' ', '_')} {done[0]}")
            return r

        bar.update = update  # type: ignore[method-assign]
        return bar

    progress_mod.progress = progress  # before any templatetool module binds the name

    real_replace = os.replace

    def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        name = re.sub(r"\.[^.]{8}\.tmp$", ".*.tmp", os.path.basename(os.fspath(dst)))  # mkstemp's random part
        event(f"rename {name} 0")
        real_replace(src, dst, *a, **k)

    os.replace = replace  # type: ignore[assignment]


def main() -> None:
    ev, ack = (int(x) for x in os.environ[ENV].split(","))
    install(ev, ack)
    from templatetool.cli.main import main as cli_main

    sys.argv[0] = "templatetool"
    cli_main()


if __name__ == "__main__":
    main()
