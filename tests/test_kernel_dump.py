"""Dump and count against the real kernel: every filter field, IPv4 and IPv6,
every protocol, zones 0/1/65535, NAT'd entries; the kernel-side filters and the
C re-check agree with the independent model."""
import pytest

from pyconntrack import Capabilities, Conntrack, Filter

from helpers import populate, table
from model import key, model_match

pytestmark = pytest.mark.kernel

FILTERS = [
    Filter(), Filter(zone=0), Filter(zone=1), Filter(zone=65535), Filter(zone=3),
    Filter(family="ipv4"), Filter(family="ipv6"),
    Filter(proto="tcp"), Filter(proto="udp"), Filter(proto="icmp"), Filter(proto="icmpv6"),
    Filter(proto="sctp"), Filter(proto="gre"), Filter(proto="udplite"), Filter(proto="dccp"),
    Filter(src="10.0.0.1"), Filter(src="10.0.0.0/24"), Filter(dst="192.0.2.2"),
    Filter(addr="192.0.2.1"), Filter(addr="10.0.1.0/24"),
    Filter(src="fd00::2"), Filter(src="fd00::/16"), Filter(dst="2001:db8::3/128"),
    Filter(addr="fd00::1"),
    Filter(reply_src="172.16.0.0/12"), Filter(reply_src="fd01::5"),
    Filter(reply_dst="10.0.0.8"),
    Filter(sport=1000), Filter(sport="2000-2001"), Filter(dport=53), Filter(dport=(1, 100)),
    Filter(mark=1), Filter(mark=(0xFF00, 0xFF00)), Filter(mark=(0, 0xFFFFFFFF)),
    Filter(zone=1, proto="tcp", dport=443, src="10.0.0.2"),
    Filter(zone=1, family="ipv6", proto="tcp", sport=4000),
    Filter(zone=2, src="10.0.0.1", dst="192.0.2.1", proto="tcp", sport=1000, dport=80),
]


@pytest.fixture
def filled(ct):
    populate(ct)
    return ct


def test_table_as_created(filled):
    everything = table(filled)
    assert len(everything) == filled.table_count()
    zones = {e.zone for e in everything.values()}
    assert zones == {0, 1, 2, 65535}


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: f.describe())
def test_dump_equals_model(filled, f):
    everything = table(filled)
    expected = {k for k, e in everything.items() if model_match(f, e)}
    got = [key(e) for e in filled.dump(f)]
    assert len(got) == len(set(got)), "duplicates in dump"
    assert set(got) == expected
    assert filled.count(f) == len(expected)


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: f.describe())
def test_fallback_dump_identical(filled, netns, f):
    """As if the kernel had no zone, mark or tuple filters: same answers."""
    none = Capabilities(probed=True, zones=True)
    with Conntrack(netns, capabilities=none) as slow:
        assert {key(e) for e in slow.dump(f)} == {key(e) for e in filled.dump(f)}


def test_every_protocol_round_trips(filled):
    by_proto = {}
    for e in filled.dump(Filter(zone=1)):
        by_proto.setdefault(e.proto_name, []).append(e)
    for name in ("tcp", "udp", "icmp", "icmpv6", "sctp", "gre", "udplite"):
        assert len(by_proto.get(name, [])) >= 3, name
    assert len(by_proto["dccp"]) >= 1
    assert all(e.icmp_type == 8 for e in by_proto["icmp"])
    assert all(e.icmp_type == 128 for e in by_proto["icmpv6"])
    assert all(e.tcp_state == "ESTABLISHED" for e in by_proto["tcp"])


def test_nat_entries_carry_reply_side(filled):
    nat = list(filled.dump(Filter(reply_src="172.16.0.5")))
    assert len(nat) == 3
    assert all(str(e.dst) == "198.51.100.1" for e in nat)


def test_abandoned_dump_does_not_block(filled):
    it = filled.dump()
    next(it)
    it.close()
    assert filled.count() == filled.table_count()
