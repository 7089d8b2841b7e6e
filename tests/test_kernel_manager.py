"""ConntrackManager against the real kernel, in a scratch netns: after each
cleanup the table holds exactly what an independent model of the Neutron
semantics says (written here from the documented meaning, not from the
manager's filters); queued requests across many zones share one walk."""
import asyncio
import ipaddress

import pytest

from pyconntrack import Capabilities, Conntrack
from pyconntrack.manager import ConntrackManager, parse_iptables_zones, parse_nft_zones

from model import key

pytestmark = pytest.mark.kernel

IPTABLES_RAW = """*raw
:PREROUTING ACCEPT [0:0]
-A neutron-openvswi-PREROUTING -m physdev --physdev-in qvbaaaaaaaa-01 -m comment --comment "Set zone for aaaaaaaa-01" -j CT --zone 4097
-A neutron-openvswi-PREROUTING -m physdev --physdev-in tapaaaaaaaa-01 -m comment --comment "Set zone for aaaaaaaa-01" -j CT --zone 4097
COMMIT
"""  # noqa: E501
NFT_RULESET = """table inet neutron {
    chain prerouting {
        iifname "tapbbbbbbbb-02" ct zone set 4098
    }
}"""
ZA, ZB = 4097, 4098
PORT_A = {"device": "tapaaaaaaaa-01", "network_id": "net-a",
          "fixed_ips": ["10.0.0.1", "fd00::1"],
          "allowed_address_pairs": [{"ip_address": "10.0.5.0/24", "mac_address": "m"}]}
PORT_B = {"device": "tapbbbbbbbb-02", "network_id": "net-a", "fixed_ips": ["10.0.0.2", "fd00::2"]}
PORT_C = {"device": "tapcccccccc-03", "network_id": "net-a", "fixed_ips": ["10.0.0.3"]}  # no zone
NETS = {"A": [ipaddress.ip_network(n) for n in ("10.0.0.1/32", "fd00::1/128", "10.0.5.0/24")],
        "B": [ipaddress.ip_network(n) for n in ("10.0.0.2/32", "fd00::2/128")]}
REMOTES4 = ["192.0.2.10", "192.0.2.11", "198.51.100.7"]
REMOTES6 = ["2001:db8::10", "2001:db8::11"]
NO_KERNEL_FILTERS = Capabilities(probed=True, zones=True)


def build_table(ct):
    """Ingress and egress entries of every device address (and of an
    unrelated one) with several remotes, protocols, ports and marks, in both
    device zones, in a zone nobody owns and in the host's zone 0."""
    rows = []
    for zone in (ZA, ZB, 4200, 0):
        for me in ("10.0.0.1", "10.0.0.2", "10.0.5.7", "10.0.0.99"):
            for r in REMOTES4:
                rows += [("tcp", r, me, 22, 0), ("tcp", r, me, 80, 1), ("udp", r, me, 53, 0),
                         ("icmp", r, me, 0, 0), ("tcp", me, r, 443, 0), ("udp", me, r, 123, 1)]
        for me in ("fd00::1", "fd00::2", "fd00::99"):
            for r in REMOTES6:
                rows += [("tcp", r, me, 22, 0), ("icmpv6", r, me, 0, 0), ("tcp", me, r, 443, 1)]
        for i, (proto, src, dst, dport, mark) in enumerate(rows):
            fam = "ipv6" if ":" in src else "ipv4"
            ct.create_many(2, zone=zone, family=fam, proto=proto, src=src, dst=dst,
                           sport=10000 + 2 * i, dport=dport, mark=mark)
        rows = []


def table(ct):
    return {key(e): e for e in ct.dump()}


def _in(addr, nets):
    return any(addr.version == n.version and addr in n for n in nets)


def _fam(e):
    return 4 if e.family == "ipv4" else 6


def model_remote(e, zone, nets, family, remotes, mark=None):
    """Neutron: both directions between a device address and a remote; no
    remotes: every entry of the device addresses."""
    if e.zone != zone or _fam(e) != family or (mark is not None and e.mark != mark):
        return False
    if not remotes:
        return _in(e.src, nets) or _in(e.dst, nets)
    rs = [ipaddress.ip_network(r) for r in remotes]
    return (_in(e.src, nets) and _in(e.dst, rs)) or (_in(e.src, rs) and _in(e.dst, nets))


def model_rule(e, zone, nets, rule):
    fam = 4 if rule["ethertype"] == "IPv4" else 6
    if e.zone != zone or _fam(e) != fam:
        return False
    if rule.get("protocol") and e.proto_name != rule["protocol"]:
        return False
    mine, other = (e.dst, e.src) if rule["direction"] == "ingress" else (e.src, e.dst)
    if not _in(mine, nets):
        return False
    prefix = rule.get("remote_ip_prefix")
    if prefix and not _in(other, [ipaddress.ip_network(prefix)]):
        return False
    lo = rule.get("port_range_min")
    if lo is not None and not (e.dport is not None
                               and lo <= e.dport <= rule.get("port_range_max", lo)):
        return False
    return True


def model_device(e, zone, nets):
    return e.zone == zone and (_in(e.src, nets) or _in(e.dst, nets))


@pytest.fixture(params=["probed", "no-kernel-filters"])
def setup(request, netns):
    caps = None if request.param == "probed" else NO_KERNEL_FILTERS
    zones = {**parse_iptables_zones(IPTABLES_RAW), **parse_nft_zones(NFT_RULESET)}
    with Conntrack(netns) as ct, ConntrackManager(netns, initial_zones=zones,
                                                  capabilities=caps) as mgr:
        build_table(ct)
        yield ct, mgr


def check(ct, before, handles, expected_gone):
    """The table lost exactly ``expected_gone``; the handles' counts add up."""
    results = [h.wait() for h in handles]
    after = table(ct)
    assert set(after) == set(before) - expected_gone, "wrong entries deleted or left"
    assert sum(r.deleted for r in results) == len(expected_gone)
    assert all(r.failed == 0 and r.errno == 0 for r in results)
    return results


def test_zone_map_from_rules(setup):
    _ct, mgr = setup
    assert mgr.zone_map() == {"aaaaaaaa-01": ZA, "bbbbbbbb-02": ZB}
    assert mgr.get_device_zone(PORT_A, create=False) == ZA
    assert mgr.get_device_zone(PORT_C, create=False) is None


@pytest.mark.parametrize("family,remotes,mark", [
    (4, ["192.0.2.10"], None), (4, ["192.0.2.10", "198.51.100.0/24"], None),
    (4, [], None), (4, [], 1), (6, ["2001:db8::11"], None), (6, [], None),
    (4, ["192.0.2.11"], 1)])
def test_delete_by_remote_ips(setup, family, remotes, mark):
    ct, mgr = setup
    before = table(ct)
    h = mgr.delete_by_remote_ips([PORT_A, PORT_B, PORT_C], f"IPv{family}", remotes, mark=mark)
    gone = {k for k, e in before.items()
            if model_remote(e, ZA, NETS["A"], family, remotes, mark)
            or model_remote(e, ZB, NETS["B"], family, remotes, mark)}
    assert gone  # the table holds something to clean for every case
    (r,) = check(ct, before, [h], gone)
    assert r.walks == 1 and mgr.walks == 1


@pytest.mark.parametrize("rule", [
    {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
     "port_range_min": 20, "port_range_max": 25, "remote_ip_prefix": "192.0.2.0/28"},
    {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 80},
    {"direction": "egress", "ethertype": "IPv4"},
    {"direction": "egress", "ethertype": "IPv4", "protocol": "udp",
     "remote_ip_prefix": "198.51.100.7/32"},
    {"direction": "ingress", "ethertype": "IPv4", "protocol": "icmp"},
    {"direction": "ingress", "ethertype": "IPv6", "protocol": "icmpv6"},
    {"direction": "egress", "ethertype": "IPv6", "protocol": "tcp", "port_range_min": 443,
     "port_range_max": 443},
], ids=lambda r: "-".join(str(v) for v in r.values()))
def test_delete_by_rule(setup, rule):
    ct, mgr = setup
    before = table(ct)
    h = mgr.delete_by_rule([PORT_A, PORT_B, PORT_C], rule)
    gone = {k for k, e in before.items()
            if model_rule(e, ZA, NETS["A"], rule) or model_rule(e, ZB, NETS["B"], rule)}
    assert gone
    check(ct, before, [h], gone)


def test_delete_by_device_keeps_other_zones_and_addresses(setup):
    ct, mgr = setup
    before = table(ct)
    h = mgr.delete_by_device([PORT_A], release_zones=True)
    gone = {k for k, e in before.items() if model_device(e, ZA, NETS["A"])}
    check(ct, before, [h], gone)
    left = table(ct)
    assert any(e.zone == ZA and str(e.dst) == "10.0.0.99" for e in left.values())
    assert any(e.zone == 0 and str(e.dst) == "10.0.0.1" for e in left.values())
    assert mgr.get_device_zone(PORT_A, create=False) is None


def test_device_without_zone_touches_nothing(setup):
    ct, mgr = setup
    before = table(ct)
    r = mgr.delete_by_device([PORT_C]).wait()
    assert (r.deleted, r.walks, mgr.walks) == (0, 0, 0)
    assert set(table(ct)) == set(before)


def test_mixed_queue_runs_in_one_walk_and_counts_each_entry_once(setup):
    ct, mgr = setup
    before = table(ct)
    rule = {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 22, "port_range_max": 22}
    with mgr.hold():
        hs = [mgr.delete_by_rule([PORT_A], rule),
              mgr.delete_by_remote_ips([PORT_B], "IPv4", ["192.0.2.10"]),
              mgr.delete_by_remote_ips([PORT_A], "IPv6", []),
              mgr.delete_by_device([PORT_B]),      # overlaps the second request
              mgr.delete_by_rule([PORT_A], rule)]  # identical to the first
    gone = {k for k, e in before.items()
            if model_rule(e, ZA, NETS["A"], rule)
            or model_remote(e, ZB, NETS["B"], 4, ["192.0.2.10"])
            or model_remote(e, ZA, NETS["A"], 6, [])
            or model_device(e, ZB, NETS["B"])}
    results = check(ct, before, hs, gone)
    assert mgr.walks == 1 and all(r.walks == 1 for r in results)
    assert results[4].deleted == 0 and results[0].deleted > 0


def test_100_requests_in_100_zones_take_one_walk(netns):
    ports = [{"device": f"tap{i:08d}-xx", "fixed_ips": [f"10.2.{i}.1", f"fd02::{i:x}:1"]}
             for i in range(100)]
    with Conntrack(netns) as ct, ConntrackManager(netns) as mgr:
        zones = [mgr.get_device_zone(p) for p in ports]
        assert zones == list(range(4097, 4197))
        for i, z in enumerate(zones):
            for zone in (z, 0):  # the host's zone holds the same tuples
                ct.create_many(3, zone=zone, src=f"10.2.{i}.1", dst="192.0.2.1", proto="tcp")
                ct.create_many(2, zone=zone, src="192.0.2.1", dst=f"10.2.{i}.1", proto="udp")
                ct.create_many(2, zone=zone, family="ipv6", src=f"fd02::{i:x}:1",
                               dst="2001:db8::1", proto="tcp")
                ct.create_many(4, zone=zone, src=f"10.2.{i}.2", dst="192.0.2.1", proto="tcp")
        before = table(ct)
        assert len(before) == 100 * 2 * 11
        with mgr.hold():
            handles = [mgr.delete_by_device([p]) for p in ports]
        assert mgr.wait()
        gone = {k for k, e in before.items() if e.zone != 0 and not str(e.src).endswith(".2")}
        results = check(ct, before, handles, gone)
        assert [r.deleted for r in results] == [7] * 100
        assert mgr.walks <= 2 and mgr.walks == 1 and mgr.passes == 1  # counted, not timed


def test_asyncio_against_the_kernel(setup):
    ct, mgr = setup
    before = table(ct)

    async def main():
        a = mgr.delete_by_remote_ips([PORT_A], "IPv4", REMOTES4[:1])
        b = mgr.delete_by_remote_ips([PORT_B], "IPv6", [])
        return await asyncio.gather(a, b)

    ra, rb = asyncio.run(main())
    gone = {k for k, e in before.items()
            if model_remote(e, ZA, NETS["A"], 4, REMOTES4[:1])
            or model_remote(e, ZB, NETS["B"], 6, [])}
    assert ra.deleted + rb.deleted == len(gone) and ra.deleted and rb.deleted
    assert set(table(ct)) == set(before) - gone
