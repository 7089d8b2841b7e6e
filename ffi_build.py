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
BPF = HERE / "bpf"
PKG_CONFIG_LIBS = ["libnetfilter_conntrack", "libmnl", "libbpf"]
CDEF_BEGIN, CDEF_END = "/* ---- CFFI-CDEF-BEGIN ---- */", "/* ---- CFFI-CDEF-END ---- */"


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


def cdef_section(path: pathlib.Path) -> str:
    """The directive-free part of a header shared with BPF and C."""
    text = path.read_text()
    return text[text.index(CDEF_BEGIN) + len(CDEF_BEGIN):text.index(CDEF_END)]


def build_bpf() -> None:
    """The eBPF object (clang) and its skeleton (bpftool), embedded in the loader."""
    try:
        subprocess.run(["make", "-s", "-C", str(BPF)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit("building bpf/ failed: install clang llvm bpftool libbpf-dev "
                         "(make deps)") from exc


build_bpf()
ffibuilder = FFI()
ffibuilder.cdef(cdef_section(BPF / "ct_index.h")
                + cdef_section(BPF / "ct_index_loader.h")
                + (CSRC / "pct_decl.h").read_text())

_cflags = pkg_config("--cflags")
_libs = pkg_config("--libs")
ffibuilder.set_source(
    "pyconntrack._pct",
    '#include "pct.h"\n#include "ct_index_loader.h"',
    sources=sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.c"))
    + ["bpf/ct_index_loader.c"],
    include_dirs=[str(CSRC.relative_to(HERE)), "bpf", "bpf/.output", *_flags("-I", _cflags)],
    libraries=[*_flags("-l", _libs), "elf", "z"],
    library_dirs=_flags("-L", _libs),
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-sign-compare", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
