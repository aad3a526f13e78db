"""VHDX headers, region tables, metadata and BAT (open_vhdx on a temp file, then a few reads)."""
import os
import tempfile

import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.vhdx import open_vhdx
    from templatetool.vhdx.check import check as vhdx_check

_TMP = tempfile.NamedTemporaryFile(prefix="fuzz-vhdx-", suffix=".vhdx", dir="/dev/shm" if os.path.isdir("/dev/shm") else None, delete=False).name


def target(data: bytes) -> None:
    # the structures sit at 64 KiB+ offsets: input byte i lands at the interesting offsets
    buf = bytearray(data[:2 << 20])
    with open(_TMP, "wb") as f:
        f.write(buf)
    d = open_vhdx(_TMP)
    try:
        for off in (0, d.size // 2, max(0, d.size - 4096)):
            d.read(off, min(4096, d.size - off))
    finally:
        d.close()
    vhdx_check(_TMP)


if __name__ == "__main__":
    common.main(target)
