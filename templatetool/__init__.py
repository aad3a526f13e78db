"""templatetool: offline shielded-VM template, BitLocker and VHDX tooling."""

import os as _os

# numpy's bundled OpenBLAS starts one busy-polling thread per core at import; we never call BLAS
# and the disk passes already use every core (forked workers), so keep it to one thread.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
