"""templatetool.tpm."""
