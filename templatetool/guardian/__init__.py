"""templatetool.guardian."""
