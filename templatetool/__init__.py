"""templatetool: offline shielded-VM template, BitLocker and VHDX tooling."""

__version__ = "0.1.0"
