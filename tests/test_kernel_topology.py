"""Real packets into a real conntrack table: flowgen in a scratch "client" netns
sends one packet per new flow over a veth into a scratch "host" netns, whose
nft ruleset sets the conntrack zone by destination prefix (prerouting and
output, priority raw). Exact entry counts per zone, protocol and family, on the
forward (PRE_ROUTING) and local (LOCAL_OUT) paths. No timing assertions."""
import ipaddress
import os
import subprocess

import pytest

from pyconntrack import Conntrack, Filter
from pyconntrack.testing.topology import Topology, TopologyError, default_prefix, flowgen_path

pytestmark = pytest.mark.kernel

K = 2000
ZONES = (5, 6, 7)
CASES = [(proto, fam) for proto in ("tcp", "udp", "icmp") for fam in (4, 6)]


def ct_proto(proto, fam):
    return "icmpv6" if proto == "icmp" and fam == 6 else proto


@pytest.fixture
def topo():
    with Topology(zones=ZONES) as t:
        yield t


@pytest.fixture
def host(topo):
    with Conntrack(topo.host_netns) as ct:
        assert ct.table_count() == 0
        yield ct


def check_zone_only(ct, topo, zone, proto, fam, k, src):
    """Exactly k entries, all in ``zone``, of the right protocol, from ``src``
    into the zone's prefix, all distinct; nothing anywhere else."""
    assert ct.count(Filter(zone=zone, proto=ct_proto(proto, fam))) == k
    assert ct.count(Filter(zone=zone)) == k
    assert ct.table_count() == k
    for other in set(ZONES) - {zone} | {0}:
        assert ct.count(Filter(zone=other)) == 0, f"entries in zone {other}"
    prefix = ipaddress.ip_network(topo.zone_prefix(zone, fam))
    entries = list(ct.dump(Filter(zone=zone)))
    assert len(entries) == k
    assert {e.family for e in entries} == {f"ipv{fam}"}
    assert {str(e.src) for e in entries} == {src}
    assert all(e.dst in prefix for e in entries)
    if proto == "tcp":
        assert {e.tcp_state for e in entries} == {"SYN_SENT"}
        assert len({(e.dst, e.sport) for e in entries}) == k
        assert {e.dport for e in entries} == {80}
    elif proto == "udp":
        assert len({(e.dst, e.dport) for e in entries}) == k
    else:
        assert {e.icmp_type for e in entries} == {8 if fam == 4 else 128}
        assert len({(e.dst, e.icmp_id) for e in entries}) == k


@pytest.mark.parametrize("proto,fam", CASES, ids=[f"{p}-ipv{f}" for p, f in CASES])
def test_forward_path_exact_counts(topo, host, proto, fam):
    """Client -> veth -> host PRE_ROUTING (zone set) -> forward -> sink."""
    r = topo.send(proto, fam, 6, K)
    assert r["sent"] == K and r["errors"] == 0, r
    check_zone_only(host, topo, 6, proto, fam, K, topo.link_address("client", fam))


@pytest.mark.parametrize("proto,fam", CASES, ids=[f"{p}-ipv{f}" for p, f in CASES])
def test_local_out_path_exact_counts(topo, host, proto, fam):
    """flowgen inside the host netns: LOCAL_OUT (zone set by the output chain)."""
    r = topo.send_local(proto, fam, 7, K)
    assert r["sent"] == K and r["errors"] == 0, r
    check_zone_only(host, topo, 7, proto, fam, K, topo.link_address("host", fam))


def test_zones_kept_apart(topo, host):
    sends = [("udp", 4, 5, 300), ("tcp", 6, 6, 500), ("icmp", 4, 7, 700), ("udp", 6, 7, 11)]
    for proto, fam, zone, n in sends:
        assert topo.send(proto, fam, zone, n)["sent"] == n
    assert host.count(Filter(zone=5)) == 300
    assert host.count(Filter(zone=6)) == 500
    assert host.count(Filter(zone=7)) == 711
    assert host.count(Filter(zone=7, family="ipv6", proto="udp")) == 11
    assert host.count(Filter(zone=0)) == 0
    assert host.table_count() == 1511


def test_both_paths_same_zone(topo, host):
    topo.send("udp", 4, 5, 400)
    topo.send_local("udp", 4, 5, 600)
    assert host.count(Filter(zone=5, src=topo.link_address("client", 4))) == 400
    assert host.count(Filter(zone=5, src=topo.link_address("host", 4))) == 600
    assert host.table_count() == 1000


def test_addresses_cycle_after_ports(topo, host):
    """Flow i: port slot i % ports, then the next destination address."""
    r = topo.send("udp", 4, 5, 2500, ports=1000, dport=3000)
    assert r["sent"] == 2500
    a1, a2, a3 = topo.zone_addresses(5, 4, 3)
    assert host.count(Filter(zone=5, dst=a1)) == 1000
    assert host.count(Filter(zone=5, dst=a2)) == 1000
    assert host.count(Filter(zone=5, dst=a3)) == 500
    assert host.count(Filter(zone=5, dport="3000-3999")) == 2500
    r = topo.send("tcp", 6, 6, 1500, ports=1000, sport_base=20000, dport=443)
    assert r["sent"] == 1500
    assert host.count(Filter(zone=6, proto="tcp", sport="20000-20999", dport=443)) == 1500


def test_reuse_sends_the_same_tuples_again(topo, host):
    """--reuse: more packets than tuples; the extra ones belong to
    established flows (no new entries), without it flowgen refuses."""
    (a1,) = topo.zone_addresses(5, 4, 1)
    r = topo.send("udp", 4, 5, 5000, ports=10, dport=4000, addresses=[a1], reuse=True)
    assert r["sent"] == 5000
    assert host.count(Filter(zone=5)) == 10
    with pytest.raises(TopologyError, match="distinct tuples"):
        topo.send("udp", 4, 5, 5000, ports=10, dport=4000, addresses=[a1])


def test_threads_and_rate_exact(topo, host):
    assert topo.send("udp", 6, 5, 3001, threads=2)["sent"] == 3001
    assert topo.send("icmp", 4, 6, 501, threads=3, rate=100000)["sent"] == 501
    assert host.count(Filter(zone=5)) == 3001
    assert host.count(Filter(zone=6, proto="icmp")) == 501


def test_flush_empties_host_table(topo, host):
    topo.send("tcp", 4, 5, 100)
    assert host.table_count() == 100
    topo.flush()
    assert host.table_count() == 0


def test_explicit_prefixes_and_high_zone():
    zones = {300: ("192.168.77.0/24", "fd00:300::/64"), 65535: "fd00:ffff::/64"}
    with Topology(zones=zones) as t, Conntrack(t.host_netns) as ct:
        assert t.zone_prefix(300, 4) == "192.168.77.0/24"
        assert t.zone_prefix(65535, 6) == "fd00:ffff::/64"
        with pytest.raises(ValueError):
            t.zone_prefix(65535, 4)     # no default IPv4 prefix above zone 255
        t.send("udp", 4, 300, 100)
        t.send("icmp", 6, 65535, 200)
        assert ct.count(Filter(zone=300, dst="192.168.77.0/24")) == 100
        assert ct.count(Filter(zone=65535, proto="icmpv6")) == 200
        assert ct.table_count() == 300


def test_namespaces_removed_on_exit_and_error():
    with Topology(zones=[5]) as t:
        names = (t.host_netns, t.client_netns)
        assert all(os.path.exists(f"/var/run/netns/{n}") for n in names)
    assert not any(os.path.exists(f"/var/run/netns/{n}") for n in names)
    with pytest.raises(RuntimeError):
        with Topology(zones=[5]) as t:
            names = (t.host_netns, t.client_netns)
            raise RuntimeError("boom")
    assert not any(os.path.exists(f"/var/run/netns/{n}") for n in names)


def test_client_netns_has_no_conntrack(topo, host):
    topo.send("udp", 4, 5, 50)
    with Conntrack(topo.client_netns) as client:
        assert client.table_count() == 0


def test_ruleset_loaded(topo):
    out = subprocess.run(["ip", "netns", "exec", topo.host_netns, "nft", "list", "ruleset"],
                         capture_output=True, text=True, check=True).stdout
    for chain in ("prerouting", "output"):
        assert f"chain {chain}" in out
    assert out.count("ct zone set ip daddr map") == 2
    assert out.count("ct zone set ip6 daddr map") == 2
    assert "10.201.5.0/24 : 5" in out


@pytest.mark.parametrize("argv", [
    ["--proto", "udp", "--family", "4", "--dst", "10.201.5.1", "--flows", "70000"],
    ["--proto", "tcp", "--family", "4", "--dst", "10.201.5.1", "--flows", "1", "--sport-base",
     "65000", "--ports", "1000"],
    ["--proto", "udp", "--family", "6", "--dst", "10.201.5.1", "--flows", "1"],
    ["--proto", "sctp", "--family", "4", "--dst", "10.201.5.1", "--flows", "1"],
    ["--proto", "udp", "--family", "4", "--flows", "1"],
    ["--proto", "udp", "--family", "4", "--dst", "10.201.5.1", "--flows", "1", "--batch", "0"],
], ids=["too-many-flows", "port-overflow", "family-mismatch", "bad-proto", "no-dst", "bad-batch"])
def test_flowgen_setup_errors(topo, host, argv):
    r = subprocess.run(["ip", "netns", "exec", topo.client_netns, flowgen_path()] + argv,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("flowgen: ")
    assert host.table_count() == 0


def test_topology_validation():
    with pytest.raises(ValueError):
        Topology(zones=[70000])
    with pytest.raises(ValueError):
        Topology(zones={5: "10.201.0.0/16", 6: None})      # overlaps zone 6's default
    with pytest.raises(ValueError):
        Topology(zones={5: "10.200.0.0/24"})                # the veth link
    with pytest.raises(ValueError):
        Topology(zones=[])
    with pytest.raises(ValueError):
        default_prefix(256, 4)
    with Topology(zones=[5]) as t:
        with pytest.raises(ValueError):
            t.send("sctp", 4, 5, 1)
        with pytest.raises(ValueError):
            t.send("udp", 4, 9, 1)      # not a zone of this topology
    with pytest.raises(TopologyError):
        t.send("udp", 4, 5, 1)          # closed
