"""templatetool.pdk."""
