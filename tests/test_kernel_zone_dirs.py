"""Zones set for one direction only (``-j CT --zone-orig/--zone-reply``,
``conntrack -I --orig-zone/--reply-zone``) against the real kernel: every
strategy lists, counts, dry-runs and deletes them as the kernel's own zone
filters do (zone Z = zone id Z, whatever the direction), and nothing else.
Kernel truth comes from conntrack-tools, never from pyconntrack's parser."""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyconntrack import Capabilities, Conntrack, Filter, InvalidFilter

import conntrack_tools as oracle
from helpers import refill
from model import model_match

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(not oracle.available(), reason="conntrack-tools missing")]

# (zone, zone_dir, family, proto, src, dst, dport): a table with every form
FORMS = [
    (7, "both", "ipv4", "udp", "10.7.0.1", "10.7.0.2", 53),
    (7, "orig", "ipv4", "udp", "10.7.1.1", "10.7.1.2", 53),
    (7, "reply", "ipv4", "udp", "10.7.2.1", "10.7.2.2", 53),
    (7, "orig", "ipv4", "tcp", "10.7.1.1", "10.7.1.2", 80),
    (7, "reply", "ipv6", "tcp", "fd07::1", "fd07::2", 80),
    (7, "orig", "ipv4", "icmp", "10.7.3.1", "10.7.3.2", 0),
    (7, "reply", "ipv6", "icmpv6", "fd07::3", "fd07::4", 0),
    (8, "orig", "ipv4", "udp", "10.7.0.1", "10.7.0.2", 55),    # reply side in zone 0
    (9, "reply", "ipv4", "udp", "10.7.1.1", "10.7.1.2", 53),
    (0, "both", "ipv4", "udp", "10.7.2.1", "10.7.2.2", 54),
    (0, "both", "ipv4", "udp", "10.7.0.1", "10.7.0.2", 53),    # zone 7's tuple in zone 0
    (65535, "reply", "ipv4", "sctp", "10.7.4.1", "10.7.4.2", 3868),
]


def build(ct: Conntrack, count: int = 2) -> None:
    for zone, zone_dir, family, proto, src, dst, dport in FORMS:
        ct.create_many(count, zone=zone, zone_dir=zone_dir, family=family, proto=proto,
                       src=src, dst=dst, dport=dport)


def truth(netns: str) -> dict:
    return {oracle.key(r): r for r in oracle.table(netns)}


NO_KERNEL_ZONE = Capabilities(probed=True, zones=True, dump_mark=True, dump_filter_v4=True,
                              flush_zone=False, dump_zone=False)

FILTERS = [
    Filter(zone=7), Filter(zone=7, proto="udp"), Filter(zone=7, dport=80),
    Filter(zone=7, zone_dir="orig"), Filter(zone=7, zone_dir="reply"),
    Filter(zone=7, zone_dir="both"), Filter(zone=7, family="ipv6"), Filter(zone=65535),
    Filter(zone=0, src="10.7.0.0/16"), Filter(zone=9, addr="10.7.1.2"),
    Filter(zone=7, proto="icmp"),
]

STRATEGIES = ["auto", "walk", "walk-no-kernel-zone", "many", "each"]


def _delete(ct, f, how):
    decoys = [Filter(zone=z, src="192.0.2.99") for z in range(100, 110)]  # > 8: zone groups
    if how in ("auto", "walk"):
        return ct.delete(f, strategy=how, allow_default_zone=True)
    if how == "walk-no-kernel-zone":
        return ct.delete(f, strategy="walk", allow_default_zone=True)
    if how == "many":
        return ct.delete_many([*decoys, f], allow_default_zone=True)
    results = ct.delete_each([*decoys, f], allow_default_zone=True)
    assert all(r.matched == 0 for r in results[:-1])
    return results[-1]


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: f.describe())
@pytest.mark.parametrize("how", STRATEGIES)
def test_zone_forms_every_strategy(netns, f, how):
    caps = NO_KERNEL_ZONE if how == "walk-no-kernel-zone" else None
    with Conntrack(netns, capabilities=caps) as ct:
        build(ct)
        before = truth(netns)
        expected = {k for k, r in before.items() if model_match(f, r)}
        assert expected, "the table must hold something to delete"
        listed = {oracle.key(e) for e in ct.dump(f)}
        assert listed == expected
        assert ct.count(f) == len(expected)
        dry = ct.delete(f, dry_run=True, allow_default_zone=True)
        assert dry.matched == len(expected) and set(truth(netns)) == set(before)
        r = _delete(ct, f, how)
        after = truth(netns)
        assert set(after) == set(before) - expected, "wrong entries deleted or left"
        assert r.failed == 0 and r.errno == 0, r
        assert r.deleted == len(expected)


def test_directional_entries_are_shown_with_their_direction(ct, netns):
    build(ct, count=1)
    ours = {oracle.key(e) for e in ct.dump()}
    assert ours == set(truth(netns))
    dirs = {(e.zone, e.zone_dir) for e in ct.dump(Filter(zone=7))}
    assert dirs == {(7, "both"), (7, "orig"), (7, "reply")}
    assert {e.to_dict()["zone_dir"] for e in ct.dump(Filter(zone=7))} == {"both", "orig", "reply"}


def test_delete_entries_of_every_form_by_tuple_zone_and_id(ct, netns):
    build(ct, count=1)
    mine = list(ct.dump(Filter(zone=7)))
    r = ct.delete_entries(mine)
    assert (r.deleted, r.failed) == (len(mine), 0)
    assert not [k for k in truth(netns) if k[2] == 7]
    assert len(truth(netns)) == len(FORMS) - 7


def test_reply_zone_delete_never_hits_a_newer_connection(ct, netns):
    """The delete of a reply-zone entry looks the tuple up in zone 0 of the
    original direction: the conntrack id keeps a zone-0 connection that
    reuses the tuple safe."""
    ct.create_many(1, zone=14, zone_dir="reply", src="10.14.0.1", dst="10.14.0.2", dport=5)
    (stale,) = ct.dump(Filter(zone=14))
    ct.delete_entries([stale])
    ct.create_many(1, zone=0, src="10.14.0.1", dst="10.14.0.2", dport=5)
    r = ct.delete_entries([stale])
    assert (r.deleted, r.already_gone) == (0, 1)
    assert [k[2] for k in truth(netns)] == [0]


def test_zone_dir_needs_a_real_zone(ct):
    with pytest.raises(InvalidFilter):
        ct.create_many(1, zone=0, zone_dir="orig")


# -- differential: random tables x random filters, conntrack-tools as the oracle --------

ZONES = [0, 1, 2, 65535]
V4 = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "192.0.2.1"]
V6 = ["fd00::1", "fd00::2", "fd00:0:0:1::1", "2001:db8::1"]
V4_NETS = ["10.0.0.0/8", "10.0.0.0/24", "10.0.0.2/32", "192.0.2.0/24", "0.0.0.0/0"]
V6_NETS = ["fd00::/8", "fd00::/64", "fd00::2/128", "2001:db8::/32", "::/0"]
PROTOS = {"ipv4": ["tcp", "udp", "icmp", "sctp", "gre", "udplite"],
          "ipv6": ["tcp", "udp", "icmpv6", "sctp", "gre", "udplite"]}


@st.composite
def rows(draw):
    fam = draw(st.sampled_from(["ipv4", "ipv6"]))
    pool = V4 if fam == "ipv4" else V6
    zone = draw(st.sampled_from(ZONES))
    return dict(zone=zone, zone_dir=draw(st.sampled_from(["both", "orig", "reply"]))
                if zone else "both",
                family=fam, proto=draw(st.sampled_from(PROTOS[fam])),
                src=draw(st.sampled_from(pool)), dst=draw(st.sampled_from(pool)),
                sport=draw(st.sampled_from([1000, 2000, 40000])),
                dport=draw(st.sampled_from([22, 53, 443])),
                mark=draw(st.sampled_from([0, 1, 0x10])),
                reply_src=draw(st.sampled_from(pool)) if draw(st.booleans()) else None,
                count=draw(st.integers(1, 3)))


@st.composite
def filters(draw):
    kw = {}
    if draw(st.integers(0, 3)):
        kw["zone"] = draw(st.sampled_from(ZONES))
        if kw["zone"] and draw(st.integers(0, 3)) == 0:
            kw["zone_dir"] = draw(st.sampled_from(["both", "orig", "reply"]))
    fam = draw(st.sampled_from([None, "ipv4", "ipv6"]))
    if fam:
        kw["family"] = fam
        nets = V4_NETS if fam == "ipv4" else V6_NETS
        for field in ("src", "dst", "addr", "reply_src"):
            if draw(st.integers(0, 3)) == 0:
                kw[field] = draw(st.sampled_from(nets))
    if draw(st.booleans()):
        kw["proto"] = draw(st.sampled_from(["tcp", "udp", "sctp", "gre", "udplite"]))
        if draw(st.booleans()):
            kw["sport"] = draw(st.sampled_from([1000, (1000, 2001), (0, 65535)]))
        if draw(st.booleans()):
            kw["dport"] = draw(st.sampled_from([53, (0, 100)]))
    if draw(st.integers(0, 3)) == 0:
        kw["mark"] = draw(st.sampled_from([1, (0x10, 0xF0), (0, 0xFF), (0, 0)]))
    return Filter(**kw)


@pytest.mark.parametrize("fallback", [False, True], ids=["probed", "no-kernel-filters"])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(table_rows=st.lists(rows(), min_size=1, max_size=10), f=filters())
def test_differential_against_conntrack_tools(netns, fallback, table_rows, f):
    caps = Capabilities(probed=True, zones=True) if fallback else None
    with Conntrack(netns, capabilities=caps) as ct:
        refill(ct, table_rows)
        before = truth(netns)
        assert {oracle.key(e) for e in ct.dump()} == set(before)
        expected = {k for k, r in before.items() if model_match(f, r)}
        assert {oracle.key(e) for e in ct.dump(f)} == expected
        assert ct.count(f) == len(expected)
        if f.is_broad_on_default_zone():
            with pytest.raises(InvalidFilter):
                ct.delete(f)
            assert set(truth(netns)) == set(before)
        r = ct.delete(f, allow_default_zone=True)
        assert set(truth(netns)) == set(before) - expected
        assert r.failed == 0 and r.deleted == len(expected)
