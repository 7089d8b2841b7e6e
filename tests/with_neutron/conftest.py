"""Neutron's own code, in-process, as root, against scratch namespaces.

Neutron runs its commands (iptables-save/-restore, ``ip netns exec ...
conntrack -D``) through oslo.privsep; with the privsep context in client
mode off, each privileged call runs in this (root) process instead of a
privsep daemon: the same functions, no daemon, no sudo. Neutron is
required here: without it these tests fail, never skip.
"""
from __future__ import annotations

import subprocess
import tempfile

import pytest

import neutron  # noqa: F401  (required: ImportError fails the run)
from neutron import privileged
from oslo_config import cfg

_SUMMARY = []


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("Neutron vs pyconntrack: entries deleted")
        for line in _SUMMARY:
            terminalreporter.write_line(line)


@pytest.fixture
def report():
    """Add a line to the run's summary (figures for the record)."""
    return _SUMMARY.append


@pytest.fixture(scope="session", autouse=True)
def neutron_config():
    from neutron.conf.agent import securitygroups_rpc as sg_cfg
    privileged.default.set_client_mode(False)   # privsep entrypoints run in this process
    try:
        sg_cfg.register_securitygroups_opts(cfg.CONF)
    except cfg.DuplicateOptError:
        pass
    cfg.CONF([], project="neutron", default_config_files=[])
    lock_dir = tempfile.mkdtemp(prefix="pct-neutron-locks-")
    cfg.CONF.set_override("lock_path", lock_dir, group="oslo_concurrency")
    yield cfg.CONF
    subprocess.run(["rm", "-rf", lock_dir], check=False)


@pytest.fixture
def scratch_pair():
    """Two scratch namespaces (one for Neutron's manager, one for the
    drop-in); removed afterwards."""
    from pyconntrack import netns as scratch
    with scratch.scratch("pct-neutron-a") as a, scratch.scratch("pct-neutron-b") as b:
        yield a, b
