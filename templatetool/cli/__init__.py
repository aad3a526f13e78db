"""templatetool.cli."""
