"""Fixtures: every kernel test runs in a scratch netns it creates and removes.

Kernel tests are marked ``kernel``. Without root or conntrack they skip, unless
PYCONNTRACK_REQUIRE_KERNEL=1 (CI), where a missing capability fails loudly.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REQUIRE_KERNEL = os.environ.get("PYCONNTRACK_REQUIRE_KERNEL") == "1"
# The suite proves the kernel's behaviour: every process (CLI subprocesses
# too) really probes, never trusting the per-boot cache. tests/test_probe_cache.py
# turns it on explicitly, in directories of its own.
os.environ["PYCONNTRACK_PROBE_CACHE"] = "0"

REQUIRE_NEUTRON = os.environ.get("PYCONNTRACK_REQUIRE_NEUTRON") == "1"

# tests/with_neutron runs Neutron's own code: collected where Neutron is installed
# (make neutron-test's venv) or required; never skipped there
if not REQUIRE_NEUTRON and importlib.util.find_spec("neutron") is None:
    collect_ignore = ["with_neutron"]


def _kernel_unavailable() -> str:
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max") and not os.path.exists(
            "/proc/net/nf_conntrack"):
        if subprocess.run(["modprobe", "nf_conntrack_netlink"], capture_output=True).returncode:
            return "no conntrack in this kernel"
    if not shutil.which("ip"):
        return "iproute2 (ip) missing"
    return ""


_REASON = _kernel_unavailable()


@pytest.fixture(autouse=True)
def _kernel_gate(request):
    """Skip kernel tests where they cannot run, or fail them in CI."""
    if _REASON and request.node.get_closest_marker("kernel"):
        if REQUIRE_KERNEL:
            pytest.fail(f"PYCONNTRACK_REQUIRE_KERNEL=1 but kernel tests cannot run: {_REASON}")
        pytest.skip(f"kernel tests need: {_REASON}")


_PIN_ROOT = "/sys/fs/bpf/pyconntrack"


def _pins() -> set:
    try:
        return set(os.listdir(_PIN_ROOT))
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def _no_pins_left_behind(request):
    """A test that attaches the eBPF index must detach it: pinned links
    outlive their namespace and would keep hooks and maps alive."""
    if _REASON:
        yield
        return
    root_existed, before = os.path.isdir(_PIN_ROOT), _pins()
    yield
    leaked = _pins() - before
    assert not leaked, f"pinned BPF objects left under {_PIN_ROOT}: {sorted(leaked)}"
    assert root_existed or not os.path.isdir(_PIN_ROOT), f"{_PIN_ROOT} left behind"


@pytest.fixture
def netns():
    from pyconntrack import netns as scratch
    with scratch.scratch("pct-test") as name:
        yield name


@pytest.fixture
def ct(netns):
    from pyconntrack import Conntrack
    with Conntrack(netns) as c:
        yield c


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


@pytest.fixture
def nobody_cli():
    """The CLI as user nobody would run an installed pyconntrack: the package
    (with its shim) and cffi's backend copied to a world-readable temporary
    directory, so that it works whatever the checkout's location (a clone in
    root's 0700 home included). The interpreter is the one under the venv;
    where nobody cannot even execute it (e.g. a pyenv build under /root),
    nobody also keeps CAP_DAC_READ_SEARCH (reading files only; still no
    CAP_NET_ADMIN or CAP_SYS_ADMIN)."""
    import tempfile

    import _cffi_backend
    import pyconntrack
    top = tempfile.mkdtemp(prefix="pct-nobody-")
    try:
        os.chmod(top, 0o755)
        shutil.copytree(os.path.dirname(pyconntrack.__file__), os.path.join(top, "pyconntrack"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(_cffi_backend.__file__, top)
        for d, dirs, files in os.walk(top):
            for name in dirs + files:
                os.chmod(os.path.join(d, name), 0o755)
        python = os.path.realpath(sys.executable)
        prefix = NOBODY
        if subprocess.run([*NOBODY, python, "-c", "pass"], capture_output=True).returncode:
            prefix = NOBODY[:-1] + ("--inh-caps=+dac_read_search",
                                    "--ambient-caps=+dac_read_search", "--")
        code = (f"import sys; sys.path.insert(0, {top!r}); from pyconntrack.cli import main; "
                "sys.exit(main())")

        def run_as_nobody(*args):
            return subprocess.run([*prefix, python, "-I", "-c", code, *args], capture_output=True,
                                  text=True, timeout=120, cwd="/")
        yield run_as_nobody
    finally:
        shutil.rmtree(top)
