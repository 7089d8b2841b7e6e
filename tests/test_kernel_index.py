"""The eBPF zone index with real packets: a client netns sends new flows over
a veth into a host netns whose nftables rules set the conntrack zone by
address; the index records them at PRE_ROUTING / LOCAL_OUT and cleans zones
without a walk. Kernel truth is checked with dumps."""
import json
import os
import subprocess
import sys
import threading

import pytest

from helpers import index_host, kernel_version, require_index
from pyconntrack import Filter, KernelUnsupported
from pyconntrack.testing.topology import Topology

from model import key, model_match

pytestmark = pytest.mark.kernel

ZONES = [5, 6, 7]


@pytest.fixture(scope="module")
def index_available():
    return require_index()


@pytest.fixture
def topo(index_available):
    with Topology(zones=ZONES) as t:
        yield t


@pytest.fixture
def host(topo):
    with index_host(topo.host_netns) as ct:
        yield ct


def snapshot(ct):
    return {key(e): e for e in ct.dump()}


def _expect_after(before, f):
    return {k for k, e in before.items() if not model_match(f, e)}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_index_cleanup_equals_kernel_truth(topo, host, proto, family):
    r = host.attach_index()
    assert not r.already_attached and r.lost == 0
    topo.send(proto, family, 5, 1500)
    topo.send(proto, family, 6, 700)
    topo.send("udp", 4, 7, 300)
    before = snapshot(host)
    assert sum(1 for e in before.values() if e.zone == 5) == 1500
    status = host.index_status()
    assert status["zones"][5]["records"] >= 1500 and not status["dirty_zones"]
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index", res.reason
    assert (res.deleted, res.failed, res.walks) == (1500, 0, 0)
    after = snapshot(host)
    assert host.count(Filter(zone=5)) == 0
    assert set(after) == _expect_after(before, Filter(zone=5))


def test_index_filtered_cleanup(topo, host):
    host.attach_index()
    for proto in ("tcp", "udp", "icmp"):
        for family in (4, 6):
            topo.send(proto, family, 5, 400)
    topo.send("udp", 4, 6, 400)
    filters = [Filter(zone=5, proto="udp", family="ipv4"),
               Filter(zone=5, family="ipv6", dport=(1, 20000)),
               Filter(zone=5, addr=topo.zone_prefix(5, 4)),
               Filter(zone=5, proto="icmp")]
    for f in filters:
        before = snapshot(host)
        res = host.delete(f)
        assert res.strategy == "index", res.reason
        assert res.failed == 0
        assert set(snapshot(host)) == _expect_after(before, f), f
        assert res.deleted == len(before) - len(_expect_after(before, f))


def test_attach_with_entries_already_present(topo, host):
    topo.send("udp", 4, 5, 1000)
    topo.send("tcp", 6, 5, 500)
    host.create_many(50, zone=5, proto="icmp", src="10.77.0.1")  # via ctnetlink
    r = host.attach_index()
    assert r.seeded == 1550 and r.lost == 0
    assert host.index_audit()["missing"] == 0
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 1550
    assert host.count(Filter(zone=5)) == 0


def test_traffic_continuing_during_cleanup(topo, host):
    host.attach_index()
    topo.send("udp", 4, 5, 3000, dport=1000)
    topo.send("udp", 4, 6, 1000)
    before = snapshot(host)
    other = {k for k, e in before.items() if e.zone != 5}
    errors = []

    def traffic():
        try:  # new flows into zone 5 (other ports) and zone 6 while we clean
            topo.send("udp", 4, 5, 20000, dport=30000, rate=40000)
            topo.send("tcp", 4, 6, 3000, rate=40000)
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=traffic)
    t.start()
    # forced: auto may rightly prefer a walk once the zone's window outgrows
    # the table's buckets (small VMs); this test is about the index path
    results = [host.delete(Filter(zone=5, dport=(1, 29999)), strategy="index")
               for _ in range(5)]
    t.join()
    assert not errors
    assert all(r.strategy == "index" and r.failed == 0 for r in results), \
        [(r.strategy, r.reason) for r in results]
    after = snapshot(host)
    gone = {k for k, e in before.items() if e.zone == 5}
    assert not gone & set(after), "an entry that existed before the cleanup survived"
    assert other <= set(after), "an entry of another zone was touched"


def test_overflow_marks_zone_dirty_then_fallback_then_clean(topo, host):
    host.attach_index(max_records=64)   # 9 chunks of 70 (index.chunks_for)
    topo.send("udp", 4, 5, 900)
    topo.send("udp", 4, 6, 50)
    status = host.index_status()
    assert 5 in status["dirty_zones"]
    before = snapshot(host)
    res = host.delete(Filter(zone=5))
    assert res.strategy != "index" and "dirty" in res.reason
    assert res.deleted == 900 and host.count(Filter(zone=5)) == 0
    assert set(snapshot(host)) == _expect_after(before, Filter(zone=5))
    assert 5 not in host.index_status()["dirty_zones"]  # resynchronised
    topo.send("udp", 4, 5, 100, dport=40000)
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 100


def test_detach_and_reattach(topo, host):
    r = host.attach_index()
    pins = r.pin_dir
    assert os.path.isdir(pins) and oct(os.stat(pins).st_mode & 0o777) == "0o700"
    assert host.attach_index().already_attached
    assert host.detach_index()
    assert not os.path.exists(pins)
    assert not host.index_status()["attached"]
    topo.send("udp", 4, 5, 100)
    res = host.delete(Filter(zone=5))
    assert res.strategy != "index" and res.deleted == 100
    host.attach_index()
    topo.send("udp", 4, 5, 100, dport=20000)
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 100


def test_audit_finds_entries_made_through_ctnetlink(topo, host):
    host.attach_index()
    topo.send("udp", 4, 5, 200)
    assert host.index_audit()["missing"] == 0
    host.create_many(30, zone=6, proto="tcp", src="10.88.0.1")
    audit = host.index_audit()
    assert audit["missing"] == 30
    assert {str(e.src) for e in audit["entries"]} == {"10.88.0.1"}


def test_forced_index_without_attach_is_refused(topo, host):
    with pytest.raises(KernelUnsupported):
        host.delete(Filter(zone=5), strategy="index")
    host.attach_index()
    with pytest.raises(KernelUnsupported):
        host.delete(Filter(zone=5, mark=1), strategy="index")


CLI = [sys.executable, "-m", "pyconntrack"]


def test_cli_attach_delete_status_detach(topo, host):
    ns = topo.host_netns
    r = subprocess.run([*CLI, "index", "attach", "--netns", ns, "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    topo.send("udp", 4, 5, 500)
    topo.send("tcp", 6, 5, 500)
    topo.send("udp", 4, 6, 300)
    before = snapshot(host)
    r = subprocess.run([*CLI, "delete", "--netns", ns, "--zone", "5", "--json"],
                       capture_output=True, text=True)
    out = json.loads(r.stdout)
    assert out["strategy"] == "index" and out["deleted"] == 1000, out
    assert set(snapshot(host)) == _expect_after(before, Filter(zone=5))
    r = subprocess.run([*CLI, "index", "status", "--netns", ns, "--json"], capture_output=True,
                       text=True)
    status = json.loads(r.stdout)
    assert status["attached"] and status["bytes_per_record"] > 0
    r = subprocess.run([*CLI, "index", "detach", "--netns", ns, "--json"], capture_output=True,
                       text=True)
    assert json.loads(r.stdout) == {"detached": True}


def test_bpf_refused_gives_reason_and_rest_works(topo):
    """Without CAP_BPF (and CAP_SYS_ADMIN, which implies it) the index is
    unavailable with a clear reason; listing and deleting still work."""
    ns = topo.host_netns
    topo.send("udp", 4, 5, 100)
    drop = ["setpriv", "--inh-caps=-bpf,-sys_admin,-perfmon",
            "--bounding-set=-bpf,-sys_admin,-perfmon", "--"]
    run = lambda *a: subprocess.run(["ip", "netns", "exec", ns, *drop, *CLI, *a],  # noqa: E731
                                    capture_output=True, text=True)
    r = run("index", "attach")
    assert r.returncode == 3 and "CAP_BPF" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("delete", "--zone", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["deleted"] == 100


def test_index_availability_is_reported_with_reason(ct):
    """On every kernel: the probe says whether the index can run, and why not."""
    caps = ct.capabilities()
    if kernel_version() >= (6, 4):
        assert caps.netfilter_bpf, caps.index_error
        assert caps.zoned_kfuncs == (kernel_version() >= (6, 11))
    else:
        assert not caps.netfilter_bpf and "6.4" in caps.index_error
        with pytest.raises(KernelUnsupported, match="6.4"):
            ct.attach_index()
        ct.create_many(10, zone=5)
        assert ct.delete(Filter(zone=5)).deleted == 10  # everything else still works


def test_many_filters_across_zones_through_the_index(topo, host):
    """delete_each / delete_many with the index attached: no walk, each
    zone's records read once, first-match attribution as in a walk."""
    host.attach_index()
    for zone in (5, 6, 7):
        topo.send("udp", 4, zone, 600)
        topo.send("tcp", 6, zone, 300)
        topo.send("icmp", 4, zone, 100)
    topo.send_local("udp", 4, 7, 200)
    before = snapshot(host)
    filters = [Filter(zone=5, proto="udp"), Filter(zone=5), Filter(zone=6, family="ipv6"),
               Filter(zone=7, dport=(1024, 1200)), Filter(zone=7, proto="icmp"),
               Filter(zone=6, addr=topo.zone_prefix(6, 4))]
    claimed, expected = set(), []
    for f in filters:
        mine = {k for k, e in before.items() if model_match(f, e)} - claimed
        claimed |= mine
        expected.append(len(mine))
    results = host.delete_each(filters)
    assert all(r.strategy == "index" and r.walks == 0 and r.failed == 0 for r in results)
    assert [r.deleted for r in results] == expected
    assert set(snapshot(host)) == set(before) - claimed
    topo.send("udp", 4, 5, 100, dport=30000)
    r = host.delete_many([Filter(zone=5, dport=(30000, 30099)), Filter(zone=7)])
    assert r.strategy == "index" and r.walks == 0
    assert host.count(Filter(zone=5)) == 0 and host.count(Filter(zone=7)) == 0
