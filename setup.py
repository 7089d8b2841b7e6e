from setuptools import setup

# cffi_modules is only understood by setup(); everything else is in pyproject.toml.
setup(cffi_modules=["ffi_build.py:ffibuilder"])
