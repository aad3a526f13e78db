"""The guarded host: attest to an ``hgs serve`` fabric, release a VM's key, boot it under QEMU.

- :mod:`templatetool.host.health`: ``host attest`` (health certificate cached in the host folder,
  refreshed before it expires) and key release over the service.
- :mod:`templatetool.host.launch`: ``host start``: swtpm on the VM's decrypted vTPM state, QEMU
  with OVMF, the vTPM (tpm-crb) and the shielded disk, console per the VM's policy.

Tutorial: docs/tutorials/guarded-fabric.md.
"""

from __future__ import annotations

from .health import HealthStatus, attest_host, cached_health, release_secret
from .launch import VmConfig, VmRun, build_qemu_argv, find_ovmf, kvm_usable, run_vm

__all__ = [
    "HealthStatus",
    "VmConfig",
    "VmRun",
    "attest_host",
    "build_qemu_argv",
    "cached_health",
    "find_ovmf",
    "kvm_usable",
    "release_secret",
    "run_vm",
]
