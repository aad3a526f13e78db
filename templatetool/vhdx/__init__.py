"""templatetool.vhdx."""
