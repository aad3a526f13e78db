"""Build hook for the one optional C extension (templatetool._xts); all metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("templatetool._xts", ["templatetool/_xts.c"], libraries=[":libcrypto.so.3"],
                             optional=True)])
