"""templatetool: offline shielded-VM template, BitLocker and VHDX tooling.

Importing the package changes nothing in the process (no environment variables, no threads).
numpy's bundled OpenBLAS may start idle threads at import; it stops them itself before every
fork (its own ``pthread_atfork`` handler), and we never call BLAS, so the parallel engine's
workers are forked from a single-threaded process (tests/test_engine.py checks the OS count).
The CLI, which owns its process, sets ``OPENBLAS_NUM_THREADS=1`` before numpy is imported.
"""

__version__ = "0.1.0"
