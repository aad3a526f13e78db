"""templatetool.catalog."""
