"""cffi build script (API mode, out of line) for the pyconntrack shim.

Not part of the installed package: setup.py names it in ``cffi_modules``.
"""
from __future__ import annotations

import pathlib
import shlex
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE / "csrc"
PKG_CONFIG_LIBS = ["libnetfilter_conntrack", "libmnl"]


def pkg_config(flag: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", flag, *PKG_CONFIG_LIBS],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            "pkg-config could not find libnetfilter_conntrack and libmnl; "
            "install libnetfilter-conntrack-dev libmnl-dev (make deps)"
        ) from exc
    return shlex.split(out)


def _flags(prefix: str, flags: list[str]) -> list[str]:
    return [f[len(prefix):] for f in flags if f.startswith(prefix)]


ffibuilder = FFI()
ffibuilder.cdef((CSRC / "pct_decl.h").read_text())

_cflags = pkg_config("--cflags")
_libs = pkg_config("--libs")
ffibuilder.set_source(
    "pyconntrack._pct",
    '#include "pct.h"',
    sources=sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.c")),
    include_dirs=[str(CSRC.relative_to(HERE)), *_flags("-I", _cflags)],
    libraries=_flags("-l", _libs),
    library_dirs=_flags("-L", _libs),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-sign-compare", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
