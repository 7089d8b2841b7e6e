"""Attach records the entries that already exist by reading conntrack's
table in BPF (no ctnetlink dump formats them): exactly this namespace's live
entries, per zone as conntrack-tools lists them, none of another namespace
(the table is shared by all), none whose timeout has passed; where the read
cannot run, a dump does the same. Every test runs in scratch namespaces it
creates and removes."""
import time

import pytest

from pyconntrack import Conntrack, Filter
from pyconntrack import _lowlevel as ll
# the same scratch topology and index host as the trust tests (fixtures)
from test_kernel_index_trust import conntrack_tool, host, index_available, listed, topo  # noqa: F401

pytestmark = pytest.mark.kernel


def _records(ct, zone):
    return ct.index_status()["zones"].get(zone, {}).get("records", 0)


def _listed_zone0(ns):
    """conntrack-tools prints no zone for zone 0"""
    return [line for line in conntrack_tool(ns, "-L").splitlines() if "zone" not in line]


def test_attach_records_what_conntrack_tools_lists_and_nothing_of_another_namespace(topo, host):
    ns, other = topo.host_netns, topo.client_netns
    host.create_many(300, zone=5, proto="udp", src="10.9.5.1")
    host.create_many(200, zone=6, family="ipv6", proto="tcp", src="fd00:9::6")
    host.create_many(40, zone=14, proto="icmp", src="10.9.14.1")
    host.create_many(30, zone=0, proto="udp", src="10.9.0.1")
    with Conntrack(other) as peer:   # the same zone ids in another namespace
        peer.create_many(500, zone=5, proto="udp", src="10.9.5.1")
        peer.create_many(100, zone=6, proto="udp", src="10.9.6.1")
    total = len(conntrack_tool(ns, "-L").splitlines())
    assert total == 570

    r = host.attach_index()
    assert r.how == "table" and r.seeded == total and r.lost == 0
    status = host.index_status()
    assert status["records"] == total and status["dirty_zones"] == []
    for zone in (5, 6, 14):
        assert _records(host, zone) == len(listed(ns, zone))
    assert _records(host, 0) == len(_listed_zone0(ns)) == 30
    assert status["hook_stats"]["tuple_chunks"] == 0   # addresses, as the hook's

    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 300, res.reason
    assert listed(ns, 5) == []
    assert len(listed(ns, 6)) == 200 and len(_listed_zone0(ns)) == 30
    assert len(listed(other, 5)) == 500 and len(listed(other, 6)) == 100


def test_a_walk_counts_the_other_namespaces_entries_it_passes_over(topo, host):
    """The walk's own accounting, read straight from the shim: this
    namespace's entries found, the other namespace's passed over (at least
    its 400: the table also holds whatever else the machine tracks)."""
    host.create_many(250, zone=15, proto="tcp", src="10.9.15.1")
    with Conntrack(topo.client_netns) as peer:
        peer.create_many(400, zone=15, proto="udp", src="10.9.15.1")
    host.attach_index()
    ix = host._index()
    w = ll.index_walk(host._h(), ix._ix, ix.netns_path, 2)   # a second walk
    assert w["entries"] == w["recorded"] == 250 and w["lost"] == 0
    assert w["foreign"] >= 400
    assert w["buckets"] == int(open("/proc/sys/net/netfilter/nf_conntrack_buckets").read())
    assert w["nodes"] >= 2 * (w["entries"] + w["foreign"])   # two chains per entry
    assert w["runs"] >= 3   # the anchor's and one per thread at least


def test_an_entry_whose_timeout_passed_is_not_recorded(topo, host):
    """An expired entry stays in the table until conntrack's collector
    comes by; no dump lists it, and the walk passes over it too."""
    ns = topo.host_netns
    host.create_many(30, zone=15, proto="udp", src="10.9.15.1", timeout=1)
    host.create_many(20, zone=15, proto="udp", src="10.9.15.2", timeout=600)
    time.sleep(2.2)
    r = host.attach_index()
    assert r.how == "table"
    assert _records(host, 15) == len(listed(ns, 15)) == 20


def test_without_a_tcp_or_udp_entry_to_find_the_table_by_attach_dumps(topo, host):
    """The table is found from one entry the conntrack kfuncs can look up
    (TCP or UDP); with ICMP entries only, attach dumps instead, and holds
    the same."""
    ns = topo.host_netns
    host.create_many(60, zone=14, proto="icmp", src="10.9.14.1")
    r = host.attach_index()
    assert r.how == "dump" and r.seeded == 60
    assert _records(host, 14) == len(listed(ns, 14)) == 60
    res = host.delete(Filter(zone=14))
    assert res.deleted == 60 and listed(ns, 14) == []


def test_an_empty_namespace_needs_no_walk(topo, host):
    r = host.attach_index()
    assert r.how == "table" and r.seeded == 0 and r.lost == 0
    topo.send("udp", 4, 5, 25)                       # the hooks record these
    assert _records(host, 5) == len(listed(topo.host_netns, 5)) == 25


def test_attach_reads_the_table_from_the_loaded_object_only(topo, host):
    """The walk program is not pinned: an index opened from its pins (a later
    process) cannot walk, and says so with EOPNOTSUPP (a resync dumps)."""
    host.create_many(10, zone=5, proto="udp", src="10.9.5.1")
    pin_dir = host.attach_index().pin_dir
    ix = ll.IndexHandle(pin_dir, 0)
    try:
        with pytest.raises(Exception) as exc:
            ll.index_walk(host._h(), ix, host._index().netns_path, 1)
        assert getattr(exc.value, "errno", None) == 95   # EOPNOTSUPP
    finally:
        ix.close()


def test_attach_while_connections_come_and_go_misses_none(topo, host):
    """The table changes while it is read: new flows arrive (recorded by the
    hooks, perhaps by the walk too), entries expire and are freed, and their
    memory is reused by new ones (a chain the walk follows may end in
    another bucket: it walks that bucket again). Afterwards every live entry
    has a record (the audit's dump is the oracle) and zone cleanups through
    the index leave nothing (conntrack-tools). nf_conntrack_max is raised
    for it where lower (a small VM's default) and restored."""
    from test_hardening_memory import conntrack_max_at_least
    with conntrack_max_at_least(300_000):
        _attach_during_churn(topo, host)


def _attach_during_churn(topo, host):
    import threading
    ns = topo.host_netns
    host.create_many(120_000, zone=7, proto="udp", src="10.9.7.1", timeout=600)
    host.create_many(20_000, zone=15, proto="udp", src="10.9.15.1", timeout=1)
    sent, errors = [], []

    def traffic():
        try:
            sent.append(topo.send("udp", 4, 5, 45_000, rate=15_000, duration=3, timeout=120))
        except Exception as exc:   # reported below
            errors.append(exc)

    gen = threading.Thread(target=traffic)
    gen.start()
    time.sleep(1.0)                       # the zone-15 entries expire meanwhile
    r = host.attach_index()
    gen.join()
    assert not errors, errors
    assert r.how == "table" and r.lost == 0
    audit = host.index_audit()
    assert audit["missing"] == 0, audit["entries"][:5]
    assert host.index_status()["dirty_zones"] == []
    for zone in (7, 5):
        live = len(listed(ns, zone))
        assert live > 0
        res = host.delete(Filter(zone=zone), strategy="index")
        # the traffic's entries may time out meanwhile (a slow VM): gone too
        assert res.strategy == "index" and res.matched >= live and res.failed == 0, res
        assert listed(ns, zone) == []
