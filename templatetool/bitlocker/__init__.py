"""templatetool.bitlocker."""
