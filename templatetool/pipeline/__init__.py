"""templatetool.pipeline."""
