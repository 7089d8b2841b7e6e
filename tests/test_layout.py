"""The tree keeps the runtime an agent embeds apart from the tooling:
importing the runtime never loads pyconntrack.bench or pyconntrack.testing,
and every package is shipped."""
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import pyconntrack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLING = ("pyconntrack.bench", "pyconntrack.testing")


def _loaded_after(code: str) -> list:
    """pyconntrack modules loaded by ``code`` in a fresh interpreter."""
    probe = code + ("\nimport sys, json\n"
                    "print(json.dumps(sorted(m for m in sys.modules "
                    "if m.startswith('pyconntrack'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.splitlines()[-1])


def _tooling(modules: list) -> list:
    return [m for m in modules if m == TOOLING[0] or m == TOOLING[1]
            or m.startswith(tuple(t + "." for t in TOOLING))]


def test_runtime_imports_no_tooling():
    # neutron_drivers subclasses Neutron's drivers: importable only with Neutron
    runtime = [m.name for m in pkgutil.iter_modules(pyconntrack.__path__)
               if not m.ispkg and m.name not in ("__main__", "neutron_drivers")]
    assert {"manager", "cli", "conntrack", "filter"} <= set(runtime)
    loaded = _loaded_after("import pyconntrack\n"
                           + "".join(f"import pyconntrack.{m}\n" for m in runtime))
    assert "pyconntrack.manager" in loaded and "pyconntrack.cli" in loaded
    assert _tooling(loaded) == []


def test_cli_parser_loads_no_demo_and_no_test_topology():
    # the parser needs the bench subcommand's arguments (the harness), not
    # the demo or the test topology
    loaded = _loaded_after("from pyconntrack import cli\ncli.build_parser()\n")
    assert "pyconntrack.bench" in loaded
    assert not {"pyconntrack.bench.demo", "pyconntrack.testing",
                "pyconntrack.testing.topology"} & set(loaded)


def test_tooling_modules_import():
    from pyconntrack.bench import demo, harness, peers, progress  # noqa: F401
    from pyconntrack.testing import topology
    import pyconntrack.bench as bench
    assert callable(bench.add_parser) and callable(bench.run)
    assert demo.Progress is progress.Progress and harness.Progress is progress.Progress
    # flowgen is found relative to the module: tools/ of this checkout
    if os.path.isfile(os.path.join(ROOT, "tools", "flowgen.c")):
        assert os.path.samefile(topology.TOOLS_DIR, os.path.join(ROOT, "tools"))


def test_every_package_is_shipped():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"pyconntrack"} | {f"pyconntrack.{m.name}"
                               for m in pkgutil.iter_modules(pyconntrack.__path__) if m.ispkg}
    assert found == listed
    assert set(TOOLING) <= found


def test_manager_split_keeps_its_names():
    # every public name pyconntrack.manager had before its split by concern
    import pyconntrack.manager as manager
    from pyconntrack import cleanup_queue, rules, zone_maps
    names = ["CleanupHandle", "ConntrackManager", "ZonesExhausted", "parse_iptables_zones",
             "parse_nft_zones", "port_networks", "port_device_key", "of_port_zone",
             "remote_ip_filters", "rule_filters", "ZONE_START", "MAX_ZONE", "DEV_KEY_LEN",
             "DEV_PREFIX_LEN", "Network", "Port", "Capabilities", "Conntrack",
             "ConntrackError", "DeleteResult", "Filter", "InvalidFilter", "PROTO_NUMBERS"]
    assert [n for n in names if not hasattr(manager, n)] == []
    assert set(manager.__all__) <= set(names)
    assert manager.CleanupHandle is cleanup_queue.CleanupHandle is pyconntrack.CleanupHandle
    assert manager.ZonesExhausted is zone_maps.ZonesExhausted is pyconntrack.ZonesExhausted
    assert manager.rule_filters is rules.rule_filters
