"""The probe on this kernel: its findings agree with the kernel's version
history and never claim a dangerous filter works where it cannot."""
import os
import re

import pytest

from pyconntrack import probe_cache, probe_capabilities

pytestmark = pytest.mark.kernel


def _version():
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return int(m.group(1)), int(m.group(2))


def test_probe_runs_and_is_cached():
    caps = probe_capabilities(refresh=True)
    # the suite turns the per-boot cache off: this is the kernel answering now
    assert probe_cache.last["source"] == "probe", probe_cache.last
    assert caps.probed, caps.probe_error
    assert caps.zones
    assert probe_capabilities() is caps


def test_probe_matches_kernel_history():
    caps = probe_capabilities()
    v = _version()
    # zone filtering in dump and flush arrived in 6.8; before, a zone flush
    # wipes every zone, and the probe must say so
    assert caps.dump_zone == (v >= (6, 8))
    assert caps.flush_zone == (v >= (6, 8))
    assert caps.dump_filter_v4 == (v >= (5, 8))
    # CTA_FILTER in a flush: EOPNOTSUPP until 6.12
    assert caps.flush_filter == (v >= (6, 12))
    assert not (caps.dump_filter_v6 and caps.dump_filter_v6_inverted)


def test_disable_env_lowers_capabilities(monkeypatch):
    monkeypatch.setenv("PYCONNTRACK_DISABLE", "dump_zone,flush_zone")
    caps = probe_capabilities()
    assert not caps.dump_zone and not caps.flush_zone
