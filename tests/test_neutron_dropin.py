"""pyconntrack.neutron without Neutron installed and without a kernel (a
fake Conntrack): Neutron's constructor arguments, zone map and restart,
cache per namespace, errors logged not raised, marks as Neutron passes them.
make neutron-test runs the same classes next to Neutron's own code."""
import logging
import subprocess
import sys

import pytest

from pyconntrack import ZonesExhausted
from pyconntrack import neutron as pn

from test_manager import HYBRID_RAW, PORT_ID_1, PORT_ID_2, FakeConntrack, entry


def rules_func(text):
    return lambda table: text.splitlines() if table == "raw" else []


@pytest.fixture
def fake():
    return FakeConntrack()


def make(fake, raw=HYBRID_RAW, filtered=None, zone_per_port=True):
    return pn.IpConntrackManager(rules_func(raw), filtered if filtered is not None else {}, {},
                                 namespace="ns1", zone_per_port=zone_per_port, conntrack=fake)


def test_importing_it_does_not_import_neutron():
    code = ("import sys, pyconntrack.neutron\n"
            "sys.exit(any(m.split('.')[0] in ('neutron', 'neutron_lib') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_zone_map_from_the_raw_table_and_restart(fake):
    m = make(fake)
    try:
        assert m._device_zone_map == {"8f46cf18-12": 4105, "0aa1b2c3-d4": 4097}
        assert m.get_device_zone({"device": PORT_ID_1}) == 4105          # not a new zone
        assert m.get_device_zone({"device": "tap0aa1b2c3-d4"}) == 4097   # interface name
        assert m.get_device_zone({"device": "9" * 8 + "-0000-4000-8000-000000000000"}) == 4106
        assert m.get_device_zone({"device": "12345678-aaaa"}, create=False) is None
        m._device_zone_map = {"x": 5000}
        assert m._device_zone_map == {"x": 5000}
    finally:
        m.close()


def test_per_network_zones(fake):
    m = make(fake, raw="", zone_per_port=False)
    try:
        a = m.get_device_zone({"device": PORT_ID_1, "network_id": "net-0000001-xyz"})
        b = m.get_device_zone({"device": PORT_ID_2, "network_id": "net-0000001-xyz"})
        assert a == b == 4097 and m._device_zone_map == {"net-0000001": 4097}
    finally:
        m.close()


def test_cleanups_take_neutrons_arguments(fake):
    fake.entries = [entry(4105, "192.0.2.9", "10.0.0.5", mark=1),
                    entry(4105, "192.0.2.9", "10.0.0.5", sport=1001),
                    entry(4105, "192.0.2.9", "10.0.0.5", proto="udp", dport=53),
                    entry(4097, "192.0.2.9", "10.0.0.6")]
    p1 = {"device": PORT_ID_1, "fixed_ips": ["10.0.0.5"], "allowed_address_pairs": []}
    p2 = {"device": PORT_ID_2, "fixed_ips": ["10.0.0.6"]}
    m = make(fake)
    try:
        m.delete_conntrack_state_by_remote_ips([p1], "IPv4", set(), mark="0x1")
        assert m.wait(10)
        assert len(fake.entries) == 3
        m.delete_conntrack_state_by_rule([p1, p2], {"direction": "ingress", "ethertype": "IPv4",
                                                    "protocol": "udp", "port_range_min": 53,
                                                    "port_range_max": 53})
        assert m.wait(10)
        assert len(fake.entries) == 2
        h = m.delete_conntrack_state_by_remote_ips([p1, p2], "IPv4", ["192.0.2.9"])
        assert h.wait(10).deleted == 2 and fake.entries == []
    finally:
        m.close()


def test_zone_zero_and_bad_input_are_logged_never_raised(fake, caplog):
    fake.entries = [entry(0, "192.0.2.9", "10.0.0.5")]
    m = make(fake, raw="-A X -m physdev --physdev-in tapaaaaaaaa-01 -j CT --zone 0\n")
    try:
        port = {"device": "aaaaaaaa-0100-4000-8000-000000000000", "fixed_ips": ["10.0.0.5"]}
        assert m.get_device_zone(port, create=False) == 0
        h = m.delete_conntrack_state_by_remote_ips([port], "IPv4", set())
        assert h.wait(10).deleted == 0 and len(fake.entries) == 1   # zone 0: skipped, as Neutron
        with caplog.at_level(logging.ERROR, logger="pyconntrack.neutron"):
            assert m.delete_conntrack_state_by_rule([port], {"direction": "sideways"}) is None
            assert m.delete_conntrack_state_by_remote_ips([port], "IPv4", set(),
                                                          mark="zz") is None
        assert len(caplog.records) == 2
    finally:
        m.close()


def test_exhaustion_frees_the_zones_of_removed_ports(fake):
    filtered = {}
    m = pn.IpConntrackManager(rules_func(""), filtered, {}, zone_per_port=True, conntrack=fake)
    try:
        m._device_zone_map = {f"{i:08x}-00": pn.ZONE_START + i
                              for i in range(pn.MAX_CONNTRACK_ZONES - pn.ZONE_START + 1)}
        for key in m._device_zone_map:         # every zone's port still there: full
            filtered[key] = {"device": key}
        new = {"device": "ffffffff-0000-4000-8000-000000000000"}
        with pytest.raises(ZonesExhausted):
            m.get_device_zone(new)
        kept = filtered[f"{5:08x}-00"]
        filtered.clear()
        filtered[kept["device"]] = kept
        assert m.get_device_zone(new) == pn.ZONE_START + 6  # others freed; highest + 1
        assert m._device_zone_map == {f"{5:08x}-00": pn.ZONE_START + 5,
                                      "ffffffff-00": pn.ZONE_START + 6}
    finally:
        m.close()


def test_get_conntrack_one_manager_per_namespace(fake, monkeypatch):
    made = []

    class Recording(pn.IpConntrackManager):
        def __init__(self, *a, **kw):
            made.append(a)
            super().__init__(*a, conntrack=fake, **kw)

    monkeypatch.setattr(pn, "IpConntrackManager", Recording)
    monkeypatch.setattr(pn, "CONTRACK_MGRS", {})
    a = pn.get_conntrack(rules_func(HYBRID_RAW), {}, {}, namespace="n1", zone_per_port=True)
    b = pn.get_conntrack(rules_func(""), {}, {}, namespace="n1")
    c = pn.get_conntrack(rules_func(""), {}, {}, namespace="n2")
    try:
        assert a is b and a is not c and len(made) == 2
        assert a.zone_per_port and a._device_zone_map  # the first caller's arguments
    finally:
        a.close()
        c.close()


def test_ovs_manager_zone_is_the_vlan_tag(fake):
    class OFPort:
        vlan_tag = 12

    fake.entries = [entry(12, "192.0.2.9", "10.0.0.5", mark=1), entry(12, "192.0.2.9", "10.0.0.5")]
    m = pn.OvsIpConntrackManager(conntrack=fake)
    try:
        port = {"device": PORT_ID_1, "fixed_ips": ["10.0.0.5"], "of_port": OFPort()}
        assert m.get_device_zone(port) == 12 and m.get_device_zone({"device": "x"}) is None
        for ethertype in ("IPv4", "IPv6"):
            m.delete_conntrack_state_by_remote_ips([port], ethertype, set(), mark="0x1")
        assert m.wait(10)
        assert fake.entries == [entry(12, "192.0.2.9", "10.0.0.5")]
    finally:
        m.close()


def test_exhaustion_is_neutrons_error_too_when_neutron_lib_is_installed(fake):
    exceptions = pytest.importorskip("neutron_lib.exceptions")  # in make neutron-test's venv
    m = pn.IpConntrackManager(rules_func(""), {"k": {"device": "0000000a-00"}}, {},
                              zone_per_port=True, conntrack=fake)
    try:
        m._device_zone_map = {"0000000a-00": 1}
        m.engine.zone_range = (pn.ZONE_START, pn.ZONE_START)
        m._device_zone_map = {"0000000a-00": pn.ZONE_START}
        with pytest.raises(exceptions.CTZoneExhaustedError) as info:
            m.get_device_zone({"device": "0000000b-0000"})
        assert isinstance(info.value, ZonesExhausted) and info.value.errno
        assert "in use" in str(info.value)
    finally:
        m.close()


@pytest.mark.kernel
def test_without_cap_net_admin_cleanups_fail_logged_the_driver_goes_on(netns):
    """docs/neutron.md, Privileges: the manager is made, each cleanup fails
    with EPERM on its handle and in the log, nothing is raised to the caller."""
    code = (
        "import logging, sys\n"
        "from pyconntrack import PermissionDenied, neutron as pn\n"
        "logging.basicConfig(level=logging.ERROR, stream=sys.stdout)\n"
        "rules = ['-A X -m physdev --physdev-in tap8f46cf18-12 -j CT --zone 4105']\n"
        f"m = pn.IpConntrackManager(lambda t: rules, {{}}, {{}}, namespace={netns!r},\n"
        "                          zone_per_port=True)\n"
        "port = {'device': '8f46cf18-1234-4000-8000-000000000000', 'fixed_ips': ['10.0.0.5']}\n"
        "h = m.delete_conntrack_state_by_remote_ips([port], 'IPv4', set())\n"
        "assert m.wait(30)\n"
        "try:\n"
        "    h.wait(0)\n"
        "except PermissionDenied as e:\n"
        "    assert e.errno == 1\n"
        "else:\n"
        "    sys.exit(9)\n"
        "m.close()\n")
    r = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pyconntrack.neutron" in r.stdout and "CAP_NET_ADMIN" in r.stdout
