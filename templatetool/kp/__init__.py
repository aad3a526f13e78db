"""templatetool.kp."""
