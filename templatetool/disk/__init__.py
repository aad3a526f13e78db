"""templatetool.disk."""
