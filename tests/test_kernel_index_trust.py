"""The eBPF zone index must never be trusted beyond what it saw: entries made
by creators the netfilter hooks do not see (ctnetlink inserts, bpf inserts,
Open vSwitch, bridge conntrack) make a zone cleanup fall back, saying why;
zones per direction are recorded and checked; a stale record never deletes
another zone's entry; pins are safe; indexes of gone namespaces are
collected. Every test runs in scratch namespaces it creates and removes."""
import json
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from helpers import index_host, require_index
from pyconntrack import Conntrack, ConntrackError, Filter
from pyconntrack import index as index_mod
from pyconntrack.testing.topology import Topology

pytestmark = pytest.mark.kernel

CLI = [sys.executable, "-m", "pyconntrack"]


@pytest.fixture(scope="module")
def index_available():
    return require_index()


@pytest.fixture
def topo(index_available):
    with Topology(zones=[5, 6, 14, 15]) as t:
        yield t


@pytest.fixture
def host(topo):
    with index_host(topo.host_netns) as ct:
        yield ct


def conntrack_tool(ns, *args):
    r = subprocess.run(["ip", "netns", "exec", ns, "conntrack", *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def listed(ns, zone):
    """Kernel truth by another tool: entries whose zone id is ``zone`` in any
    direction (conntrack-tools prints zone=, zone-orig=, zone-reply=)."""
    out = conntrack_tool(ns, "-L")
    pat = re.compile(rf"\bzone(-orig|-reply)?={zone}\b")
    return [line for line in out.splitlines() if pat.search(line)]


def cli(*args, env=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


# -- creators the hooks do not see ----------------------------------------------------

def test_ctnetlink_inserts_after_attach_fall_back_then_resync(topo, host):
    host.attach_index()
    topo.send("udp", 4, 5, 200)
    for i in range(6):
        conntrack_tool(topo.host_netns, "-I", "-p", "udp", "-s", "10.77.0.1", "-d", "10.77.0.2",
                       "--sport", str(1000 + i), "--dport", "53", "-t", "300", "-w", "11")
    assert len(listed(topo.host_netns, 11)) == 6
    r = cli("delete", "--netns", topo.host_netns, "--zone", "11", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["strategy"] != "index" and "inserted through ctnetlink" in out["reason"], out
    assert out["deleted"] == 6
    assert listed(topo.host_netns, 11) == []
    # the fallback resynchronised the index: it vouches again, and knows zone 5
    assert host.index_status()["blind_spot"] == ""
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 200, res.reason
    assert listed(topo.host_netns, 5) == []


def test_index_resync_makes_the_index_vouch_again_after_own_inserts(topo, host):
    host.attach_index()
    topo.send("udp", 4, 5, 50)
    assert host.index_resync() == 0                    # vouches: nothing to do
    host.create_many(30, zone=6, proto="udp", src="10.66.0.1")     # through ctnetlink
    assert "ctnetlink" in host.index_status()["blind_spot"]
    assert host.index_resync() == 0                    # one walk, nothing lost
    assert host.index_status()["blind_spot"] == ""
    res = host.delete(Filter(zone=6))
    assert res.strategy == "index" and res.deleted == 30, res.reason
    assert listed(topo.host_netns, 6) == []


def test_api_inserts_fall_back_and_nothing_is_left(topo, host):
    host.attach_index()
    topo.send("tcp", 6, 6, 100)
    host.create_many(40, zone=6, proto="udp", src="10.66.0.1")     # through ctnetlink
    res = host.delete(Filter(zone=6))
    assert res.strategy != "index" and "ctnetlink" in res.reason
    assert res.deleted == 140 and host.count(Filter(zone=6)) == 0
    assert host.index_audit()["missing"] == 0


@pytest.fixture(scope="module")
def bpf_inserter(index_available):
    """Insert UDP entries the way an XDP/tc datapath does (bpf_xdp_ct_alloc +
    bpf_ct_insert_entry, tools/ct_insert.bpf.c, built by make build), through
    bpftool's test run inside a namespace: no netfilter hook sees them."""
    if not index_available:   # zoned kfuncs: bpf_ct_opts carries a zone from 6.11
        pytest.skip(f"kernel {os.uname().release}: bpf_ct_opts has no zone (Linux 6.11+)")
    obj = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", ".output",
                       "ct_insert.bpf.o")
    assert os.path.exists(obj), f"{obj} is missing: make build (make -C tools) makes it"
    pin = f"/sys/fs/bpf/pct-test-ct-insert-{uuid.uuid4().hex[:8]}"
    subprocess.run(["bpftool", "prog", "load", obj, pin, "type", "xdp"], check=True)

    def insert(ns, *, zone, zone_dir=0, sport=1000, count=8):
        req = (socket.inet_aton("10.78.0.1") + socket.inet_aton("10.78.0.2")
               + struct.pack("!HH", sport, 53) + struct.pack("=HBBii8x", zone, zone_dir, count, 0, 0))
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "in"), os.path.join(d, "out")
            with open(src, "wb") as f:
                f.write(req)
            subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "bpftool", "prog", "run",
                            "pinned", pin, "data_in", src, "data_out", dst, "repeat", "1"],
                           check=True, capture_output=True)
            with open(dst, "rb") as f:
                inserted, error = struct.unpack("=ii", f.read()[16:24])
        assert error == 0, os.strerror(-error)
        return inserted

    insert.obj = obj
    try:
        yield insert
    finally:
        os.unlink(pin)


def test_bpf_inserts_after_attach_fall_back_then_resync(topo, host, bpf_inserter):
    """bpf_ct_insert_entry bypasses the hooks; it counts the namespace's
    insert statistic, so the index must stop vouching, for every zone form."""
    ns = topo.host_netns
    host.attach_index()
    topo.send("udp", 4, 5, 100)
    for zone_dir, sport in ((0, 1000), (1, 2000), (2, 3000)):    # both, original, reply
        assert bpf_inserter(ns, zone=5, zone_dir=zone_dir, sport=sport, count=8) == 8
    assert bpf_inserter(ns, zone=6, sport=4000, count=8) == 8
    assert len(listed(ns, 5)) == 124
    assert host.index_status()["blind_spot"] != ""
    r = cli("delete", "--netns", ns, "--zone", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["strategy"] != "index" and "inserted through ctnetlink or BPF" in out["reason"], out
    assert out["deleted"] == 124
    assert listed(ns, 5) == []
    assert len(listed(ns, 6)) == 8                          # another zone untouched
    # resynchronised: the index vouches again and knows zone 6's BPF entries
    assert host.index_status()["blind_spot"] == ""
    res = host.delete(Filter(zone=6))
    assert res.strategy == "index" and res.deleted == 8, res.reason
    assert listed(ns, 6) == []


def test_entry_count_beyond_records_falls_back(topo, host):
    """A creator that moves no statistic (OVS, bridge conntrack, act_ct) still
    shows in the namespace's count: more entries than records."""
    host.attach_index()
    topo.send("udp", 4, 5, 50)
    ix = host._index()
    # forget records behind the index's back (as if their entries had been
    # made by a creator the hooks cannot see)
    recs = ix._ix.stats()
    assert recs["recorded"] >= 50
    slots = list(range(ix.zone(5)["tail"], ix.zone(5)["head"]))[:10]
    from pyconntrack._lowlevel import ffi, lib
    arr = ffi.new("unsigned long long[]", slots)
    assert lib.cti_drop_records(ix._ix.raw, 5, arr, len(slots)) == 10
    res = host.delete(Filter(zone=5))
    assert res.strategy != "index" and "the index only" in res.reason, res.reason
    assert res.deleted == 50 and host.count(Filter(zone=5)) == 0


# -- zones per direction ----------------------------------------------------------------

DIR_RULES = """table inet pct_dir {{
  chain p {{ type filter hook prerouting priority raw - 10; policy accept;
    ip daddr {p14} ct original zone set 14
    ip daddr {p15} ct reply zone set 15
  }}
}}
"""


def _directional_rules(topo):
    subprocess.run(["ip", "netns", "exec", topo.host_netns, "nft", "-f", "-"], check=True,
                   input=DIR_RULES.format(p14=topo.zone_prefix(14, 4), p15=topo.zone_prefix(15, 4)),
                   text=True)


@pytest.mark.parametrize("when", ["before_attach", "after_attach"])
def test_zones_per_direction_from_packets(topo, host, when):
    _directional_rules(topo)
    if when == "after_attach":
        host.attach_index()
    for proto in ("udp", "tcp", "icmp"):
        topo.send(proto, 4, 14, 100)
        topo.send(proto, 4, 15, 100)
    topo.send("udp", 4, 5, 100)
    assert all("zone-orig=14" in line for line in listed(topo.host_netns, 14))
    assert all("zone-reply=15" in line for line in listed(topo.host_netns, 15))
    assert len(listed(topo.host_netns, 14)) == 300 and len(listed(topo.host_netns, 15)) == 300
    if when == "before_attach":
        assert host.attach_index().seeded >= 700
    assert host.index_audit()["missing"] == 0
    status = host.index_status()
    assert status["zones"][14]["records"] == 300 and status["zones"][15]["records"] == 300
    for zone in (14, 15):
        res = host.delete(Filter(zone=zone))
        assert res.failed == 0
        assert listed(topo.host_netns, zone) == [], (zone, res)
        assert res.deleted == 300, (zone, res)
    assert len(listed(topo.host_netns, 5)) == 100


def test_stale_record_never_deletes_another_zone(topo, host):
    """A reply-zone-14 record whose tuple a zone-0 connection now uses: the
    zone-14 cleanup must leave the zone-0 entry alone."""
    host.create_many(5, zone=0, proto="udp", src="10.99.0.1", dst="10.99.0.2", sport=4000,
                     dport=53)
    host.create_many(5, zone=0, proto="tcp", src="10.99.0.1", dst="10.99.0.2", sport=4000,
                     dport=80)
    host.attach_index()
    ix = host._index()
    for proto, dport in ((17, 53), (6, 80)):
        for i in range(5):
            for zdir in (1, 2, 3):
                ix._ix.add_record(14, 4, proto, "10.99.0.1", "10.99.0.2", 4000 + i, dport, zdir)
    res = host.delete(Filter(zone=14))
    assert res.deleted == 0, res
    assert host.count(Filter(zone=0, src="10.99.0.1")) == 10
    assert host.index_status()["zones"].get(14, {"records": 0})["records"] == 0


# -- lifecycle ----------------------------------------------------------------------------

def _links(pin_dir):
    """The index's pinned links as the kernel shows them (bpftool)."""
    return [json.loads(subprocess.run(["bpftool", "-j", "link", "show", "pinned",
                                       os.path.join(pin_dir, name)],
                                      capture_output=True, text=True, check=True).stdout)
            for name in index_mod.LINK_PINS]


def _link_ids(pin_dir):
    return [link["id"] for link in _links(pin_dir)]


def test_namespace_deleted_while_attached_is_collected(index_available):
    name = f"pct-gc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with Conntrack(name) as ct:
            d = ct.attach_index().pin_dir
        ids = _link_ids(d)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert os.path.isdir(d)   # links keep the namespace alive until collected
    r = cli("index", "gc", "--json")
    assert r.returncode == 0, r.stderr
    assert d in json.loads(r.stdout)["removed"]
    assert not os.path.exists(d)
    for link_id in ids:
        out = subprocess.run(["bpftool", "link", "show", "id", str(link_id)],
                             capture_output=True, text=True)
        assert out.returncode != 0, f"link {link_id} still exists"


def _index_of_gone_namespace() -> tuple:
    """Attach the index to a namespace, then delete the namespace (as Neutron's
    L3 agent does with a router's): (name, pin directory left behind)."""
    name = f"pct-gc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with Conntrack(name) as ct:
            d = ct.attach_index().pin_dir
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    return name, d


def test_detach_by_pin_dir_when_the_name_is_gone(index_available):
    name, d = _index_of_gone_namespace()
    r = cli("index", "detach", "--netns", name)
    assert r.returncode != 0 and "not found" in r.stderr
    r = cli("index", "detach", "--pin-dir", d, "--json")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(d)


def test_agent_start_removes_the_index_of_a_gone_namespace(index_available, netns):
    """A router namespace deleted while the agent was down: the manager's start
    collects its index (pins, links), so the namespace can really go."""
    from pyconntrack import ConntrackManager
    _, d = _index_of_gone_namespace()
    assert os.path.isdir(d)
    with ConntrackManager(netns):
        assert not os.path.exists(d)


def test_agent_restart_keeps_the_index(topo, host):
    host.attach_index()
    topo.send("udp", 4, 5, 100)
    with Conntrack(topo.host_netns) as other:   # a new process would see the same pins
        res = other.delete(Filter(zone=5))
        assert res.strategy == "index" and res.deleted == 100


# -- pins -----------------------------------------------------------------------------------

@pytest.fixture
def private_bpffs(index_available, monkeypatch):
    """A bpffs of our own, so pin-root attacks are tested without touching the
    host's /sys/fs/bpf."""
    d = tempfile.mkdtemp(prefix="pct-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=1777", "bpf", d], check=True)
    monkeypatch.setenv(index_mod.PIN_ROOT_ENV, os.path.join(d, "pyconntrack"))
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


def _tree(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_uid)
    st = os.lstat(path)
    out[path] = (st.st_mode, st.st_uid)
    return out


@pytest.mark.parametrize("plant", ["symlink", "foreign_dir", "wide_mode"])
def test_planted_pin_root_is_refused_untouched(topo, private_bpffs, plant):
    root = os.environ[index_mod.PIN_ROOT_ENV]
    target = os.path.join(private_bpffs, "target")
    os.mkdir(target, 0o755)
    if plant == "symlink":
        os.symlink(target, root)
    elif plant == "foreign_dir":
        os.mkdir(root, 0o700)
        os.chown(root, 65534, 65534)
    else:
        os.mkdir(root, 0o777)
        os.chmod(root, 0o777)
    before = _tree(private_bpffs)
    r = cli("index", "attach", "--netns", topo.host_netns)
    assert r.returncode != 0
    assert "refusing" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert _tree(private_bpffs) == before
    # deletes do not trust it either
    topo.send("udp", 4, 5, 20)
    r = cli("delete", "--netns", topo.host_netns, "--zone", "5", "--json")
    out = json.loads(r.stdout)
    assert out["strategy"] != "index" and out["deleted"] == 20


def test_planted_symlink_at_the_real_pin_root(topo):
    """The real path, when no index lives there: plant, attach (refused,
    target untouched), remove the plant."""
    if os.path.lexists(index_mod.PIN_ROOT) or index_mod.PIN_ROOT_ENV in os.environ:
        pytest.skip(f"{index_mod.PIN_ROOT} is in use (another index is attached)")
    target = tempfile.mkdtemp(prefix="pct-plant-")
    os.chmod(target, 0o755)
    try:
        os.symlink(target, index_mod.PIN_ROOT)
        r = cli("index", "attach", "--netns", topo.host_netns)
        assert r.returncode != 0 and "symlink" in r.stderr, r.stderr
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755 and os.listdir(target) == []
    finally:
        if os.path.islink(index_mod.PIN_ROOT):
            os.unlink(index_mod.PIN_ROOT)
        shutil.rmtree(target)


def test_pins_are_root_only_and_made_fresh(topo, private_bpffs):
    with Conntrack(topo.host_netns) as ct:
        d = ct.attach_index().pin_dir
        try:
            for p in (os.path.dirname(d), d):
                st = os.lstat(p)
                assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
                assert st.st_uid == 0
        finally:
            ct.detach_index()
    assert not os.path.exists(os.path.dirname(d))


def _reaper_pins(d):
    return sorted(n for n in os.listdir(d) if n.startswith(index_mod.REAPER_PIN_PREFIX))


def test_reopening_uses_the_pinned_reaper_of_this_build_only(topo, host, bpf_inserter):
    """An attached index is opened from its pins (no program load); a reaper
    pinned by another build, or a foreign program under this build's name,
    is never run: the object is loaded again and its own reaper pinned."""
    d = host.attach_index().pin_dir
    (mine,) = _reaper_pins(d)
    topo.send("udp", 4, 5, 40)

    def delete_in_a_new_process(n):
        r = cli("delete", "--netns", topo.host_netns, "--zone", "5", "--json")
        out = json.loads(r.stdout)
        assert out["strategy"] == "index" and out["deleted"] == n, out

    def pinned_prog_id():
        out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", os.path.join(d, mine)],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["id"]

    loaded = pinned_prog_id()
    delete_in_a_new_process(40)
    assert _reaper_pins(d) == [mine]
    assert pinned_prog_id() == loaded     # opened from the pins, not loaded again
    # a previous build's reaper: replaced by this build's
    os.rename(os.path.join(d, mine), os.path.join(d, index_mod.REAPER_PIN_PREFIX + "1" * 16))
    topo.send("udp", 4, 5, 30, dport=20000)
    delete_in_a_new_process(30)
    assert _reaper_pins(d) == [mine]
    # a program that is not the reaper of these maps, under this build's name
    os.unlink(os.path.join(d, mine))
    subprocess.run(["bpftool", "prog", "load", bpf_inserter.obj, os.path.join(d, mine),
                    "type", "xdp"], check=True)
    foreign = subprocess.run(["bpftool", "prog", "show", "pinned", os.path.join(d, mine)],
                             capture_output=True, text=True, check=True).stdout.split(":")[0]
    topo.send("udp", 4, 5, 20, dport=21000)
    delete_in_a_new_process(20)
    ours = subprocess.run(["bpftool", "prog", "show", "pinned", os.path.join(d, mine)],
                          capture_output=True, text=True, check=True).stdout
    assert ours.split(":")[0] != foreign and "cti_reap" in ours, ours
    assert listed(topo.host_netns, 5) == []


def test_ip_netns_exec_sees_the_host_bpffs(topo, host):
    ns = topo.host_netns
    r = subprocess.run(["ip", "netns", "exec", ns, *CLI, "index", "attach", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert host.index_status()["attached"]          # pinned in the host's bpffs
    r = subprocess.run(["ip", "netns", "exec", ns, *CLI, "index", "status", "--json"],
                       capture_output=True, text=True)
    assert json.loads(r.stdout)["attached"] is True, r.stdout
    topo.send("udp", 4, 5, 30)
    r = subprocess.run(["ip", "netns", "exec", ns, *CLI, "delete", "--zone", "5", "--json"],
                       capture_output=True, text=True)
    out = json.loads(r.stdout)
    assert out["strategy"] == "index" and out["deleted"] == 30, out


# -- small items -------------------------------------------------------------------------

def test_disable_reaches_the_index(topo, host, monkeypatch):
    host.attach_index()
    topo.send("udp", 4, 5, 50)
    monkeypatch.setenv("PYCONNTRACK_DISABLE", "zoned_kfuncs")
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 50
    assert host._index().zoned_kfuncs is False
    monkeypatch.setenv("PYCONNTRACK_DISABLE", "netfilter_bpf")
    topo.send("udp", 4, 5, 20, dport=20000)
    res = host.delete(Filter(zone=5))
    assert res.strategy != "index" and res.deleted == 20


def test_reattach_with_another_size_is_a_clear_error(topo, host):
    host.attach_index(max_records=4096)
    with pytest.raises(ConntrackError, match="another --max-records"):
        host.attach_index(max_records=8192)
    r = cli("index", "attach", "--netns", topo.host_netns, "--max-records", "8192")
    assert r.returncode != 0 and "another --max-records" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert host.attach_index().already_attached          # no size: reuse


def test_status_counts_records_that_exist(topo, host):
    host.attach_index(max_records=64)
    topo.send("udp", 4, 5, 900)
    status = host.index_status()
    # records are kept in chunks of 70: 64 asked for is 1 full chunk; the map
    # has room for 2 more per zone of 4 zones (one per 20 records): 9 chunks,
    # 630 slots, which one zone's 900 overflow
    assert status["max_records"] == index_mod.capacity(64) == 70
    assert status["max_records"] <= status["zones"][5]["records"] <= 9 * 70
    assert status["records"] == status["zones"][5]["records"]
    assert 5 in status["dirty_zones"]
    assert status["memory_bytes"] > 0 and status["memory_max_bytes"] >= status["memory_bytes"]


def test_the_record_map_has_room_for_each_zones_partly_used_chunks():
    # 256 records: 4 full chunks of 70, and 2 more for each of 13 zones (one
    # per 20 records); those 30 chunks hold 260 records so spread
    assert index_mod.capacity(256) == 260 and index_mod.chunks_for(256) == 30
    assert index_mod.capacity(260) == 260 and index_mod.capacity(261) == 280
    # from 65,536 x 20 records on, room for every zone: 2 x 65,536 more
    assert index_mod.chunks_for(2_100_000) == 30_000 + 2 * 65536
    assert index_mod.chunks_for(65536 * 20) == 18_725 + 2 * 65536
    assert index_mod.chunks_for(0) == 0


def test_an_index_holds_its_records_however_many_zones_they_are_spread_over(topo, host):
    """Records live in chunks of 70 per zone, so a zone in use holds one or
    two partly used chunks whatever its records: 300 zones of 10 entries
    need 300 chunks or more, where 3,000 records fill 43. The map makes
    room for that (355 chunks for 3,100 records): an index sized for the
    records holds them all (the kernel's view: conntrack-tools' count of
    each zone) and serves the cleanups. They were added by attach's read
    of the table, so, like the hook's, they are the entries' addresses: no
    tuple chunk."""
    zones = range(100, 400)
    for z in zones:
        host.create_many(10, zone=z, src=f"10.9.{z >> 8}.{z & 0xff}", timeout=600)
    assert host.attach_index(max_records=3100).how == "table"
    status = host.index_status()
    assert status["dirty_zones"] == [] and status["records"] == 3000
    assert status["max_records"] == index_mod.capacity(3100) == 3100
    assert _chunks(status["pin_dir"], "cti_tuples") == 0
    assert status["memory_bytes"] <= status["memory_max_bytes"]
    for z in (100, 250, 399):
        assert len(listed(topo.host_netns, z)) == 10
        res = host.delete(Filter(zone=z))
        assert res.strategy == "index" and res.deleted == 10, res.reason
        assert listed(topo.host_netns, z) == []
    assert len(listed(topo.host_netns, 101)) == 10


def _chunks(pin_dir, name="cti_records"):
    """Elements of the record (or tuple) map as the kernel holds them (bpftool)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                          os.path.join(pin_dir, name)],
                         capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))


def test_records_live_in_chunks_freed_once_the_zone_is_cleaned(topo, host):
    """70 records per element of the record map; a zone's chunks go when
    its cleanup has passed them, the other zones' stay. The hook's records
    are their entries' addresses: no tuple is kept for them."""
    ns = topo.host_netns
    pin_dir = host.attach_index(max_records=8192).pin_dir
    topo.send("udp", 4, 5, 350)                     # slots 0..349: 5 chunks
    topo.send("udp", 4, 6, 70)                      # 1 chunk
    assert _chunks(pin_dir) == 6 and _chunks(pin_dir, "cti_tuples") == 0
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 350, res
    assert listed(ns, 5) == [] and len(listed(ns, 6)) == 70      # conntrack-tools
    assert _chunks(pin_dir) == 1
    status = host.index_status()
    assert status["records"] == 70 and 5 not in status["zones"]
    assert host.delete(Filter(zone=6)).deleted == 70
    assert _chunks(pin_dir) == 0 and listed(ns, 6) == []


def test_a_walks_records_keep_their_tuples_until_the_zone_is_cleaned(topo, host):
    """Records a resync's walk adds (of entries made through ctnetlink
    after attach, which the hooks never see) come from a dump, not from an
    address the hook saw: their tuples are kept, 35 to a chunk of the tuple
    map, and go with the zone's cleanup; the hook's records in the same
    zone keep none."""
    ns = topo.host_netns
    pin_dir = host.attach_index(max_records=8192).pin_dir
    host.create_many(100, zone=5, src="10.9.7.1", timeout=600)
    assert host.index_resync(force=True) == 0                    # slots 0..99
    assert _chunks(pin_dir, "cti_tuples") == 3                   # 35 + 35 + 30
    assert host.index_status()["hook_stats"]["tuple_chunks"] == 3
    topo.send("udp", 4, 5, 40)                                   # slots 100..139
    assert _chunks(pin_dir, "cti_tuples") == 3
    assert host.index_audit()["missing"] == 0
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 140, res
    assert listed(ns, 5) == []                                   # conntrack-tools
    assert _chunks(pin_dir, "cti_tuples") == 0 and _chunks(pin_dir) == 0
    assert host.index_status()["hook_stats"]["tuple_chunks"] == 0


def test_the_hook_reads_entries_with_plain_loads_where_the_kernel_knows_nf_conn(topo, host):
    """Where the kernel's own BTF describes struct nf_conn, the hook reads a
    new entry with plain loads, not probe-read helper calls (about half the
    hook's cost per new flow); elsewhere with probe reads. The kernel's own
    view of the loaded program (bpftool) is the oracle, and the index
    serves a delete either way."""
    btf = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True, check=True).stdout
    kernel_knows_nf_conn = "STRUCT 'nf_conn' size=" in btf
    pin_dir = host.attach_index().pin_dir
    prog_ids = {link["prog_id"] for link in _links(pin_dir)}
    for prog_id in prog_ids:
        xlated = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id)],
                                capture_output=True, text=True, check=True).stdout
        assert "cti_record" in xlated or "record_new" in xlated, xlated[:200]
        assert ("bpf_probe_read_kernel" in xlated) != kernel_knows_nf_conn
    topo.send("udp", 4, 5, 40)
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 40, res
    assert listed(topo.host_netns, 5) == []                      # conntrack-tools


BPF_F_NO_PREALLOC = 1


def _map_info(pin_dir, name):
    """The kernel's own view of a pinned map (bpftool), not ours."""
    return json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned",
                                      os.path.join(pin_dir, name)],
                                     capture_output=True, text=True, check=True).stdout)


def test_preallocated_index_serves_deletes_and_states_its_memory(topo, host):
    ns = topo.host_netns
    r = cli("index", "attach", "--netns", ns, "--max-records", "4096", "--preallocate",
            "--json")
    assert r.returncode == 0, r.stderr
    pin_dir = json.loads(r.stdout)["pin_dir"]
    assert _map_info(pin_dir, "cti_records")["flags"] & BPF_F_NO_PREALLOC == 0
    topo.send("udp", 4, 5, 300)
    topo.send("udp", 4, 6, 100)
    status = host.index_status()
    assert status["preallocated"] is True and status["records"] == 400
    # the whole map from the start: 4096 records are 59 full chunks of 70,
    # and room for two partly used ones in each of 205 zones (one per 20
    # records): 469 chunks, each a 1,736 B element as the kernel sizes it
    # (bpftool), 512 buckets, the zone table; the tuple map (walks' records,
    # none here) has 1,024 buckets and up to 938 chunks of 2 KiB, on demand
    info = _map_info(pin_dir, "cti_records")
    assert info["max_entries"] == 469 and info["bytes_value"] + info["bytes_key"] + 48 == 1736
    assert _map_info(pin_dir, "cti_tuples")["max_entries"] == 938
    assert status["memory_bytes"] == 469 * 1736 + (512 + 1024) * 16 + 65536 * 80
    assert status["memory_max_bytes"] == status["memory_bytes"] + 938 * 2048
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 300, res
    assert listed(ns, 5) == [] and len(listed(ns, 6)) == 100   # conntrack-tools
    assert host.index_audit()["missing"] == 0
    assert host.attach_index().already_attached               # reopened as it is
    assert host.index_status()["preallocated"] is True


def test_default_index_allocates_per_record_and_refuses_preallocate_attached(topo, host):
    r = host.attach_index(max_records=4096)
    assert _map_info(r.pin_dir, "cti_records")["flags"] & BPF_F_NO_PREALLOC
    topo.send("udp", 4, 5, 100)
    status = host.index_status()
    assert status["preallocated"] is False and status["memory_bytes"] < status["memory_max_bytes"]
    with pytest.raises(ConntrackError, match="without --preallocate"):
        host.attach_index(preallocate=True)
    r = cli("index", "attach", "--netns", topo.host_netns, "--preallocate")
    assert r.returncode != 0 and "without --preallocate" in r.stderr, r.stderr


def test_non_root_attach_exits_3(topo, nobody_cli):
    r = nobody_cli("index", "attach", "--netns", topo.host_netns)
    assert r.returncode == 3, (r.returncode, r.stderr)


# -- issue 12: records of entries that end on their own are pruned ----------------------

def _sweeper(pin_dir):
    """The sweeper's map value as the kernel holds it (bpftool, by BTF)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                          os.path.join(pin_dir, "cti_sweeper")],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["formatted"]["value"]


def _stop_sweeper(pin_dir):
    """Stop the sweeper: writing its map element from user space cancels the
    element's BPF timer. Isolates the hook's own pruning."""
    path = os.path.join(pin_dir, "cti_sweeper")
    size = _map_info(pin_dir, "cti_sweeper")["bytes_value"]
    subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "0", "0", "0", "0",
                    "value", *["0"] * size], check=True)
    time.sleep(0.2)                    # a run in progress ends
    runs = _sweeper(pin_dir)["runs"]
    time.sleep(0.5)
    assert _sweeper(pin_dir)["runs"] == runs, "the sweeper still runs"


def test_records_of_a_zone_without_new_connections_are_swept(topo, host):
    """A zone whose connections all ended and that gets no new ones: the hook
    never prunes it (it prunes a zone as it records into it), the sweeper
    does, so its records do not hold the room another zone needs."""
    ns = topo.host_netns
    host.attach_index(max_records=4000)                      # 458 chunks (chunks_for)
    topo.send("udp", 4, 5, 11000)                            # 158 of them
    # the zone's connections end (conntrack-tools deletes them: no timing),
    # and it gets no new ones
    conntrack_tool(ns, "-D", "-w", "5")
    assert listed(ns, 5) == []
    deadline = time.monotonic() + 20
    while host.index_status()["zones"].get(5, {}).get("records", 0) > 64 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    z = host._index().zone(5)
    assert z["records"] <= 64 and z["pruned"] >= 11000 - 64, z   # the hook's tail window
    topo.send("udp", 4, 6, 3000)                             # needs ~43 chunks
    status = host.index_status()
    assert status["dirty_zones"] == [], status["dirty_zones"]
    res = host.delete(Filter(zone=6))
    assert res.strategy == "index" and res.deleted == 3000, res.reason
    assert listed(ns, 6) == []
    assert host.index_audit()["missing"] == 0


def _hold_packets(ns, dev="zsink"):
    """Queue what the host netns sends to dev behind an htb class of 8 bit/s:
    the packets, and with them their conntrack entries, stay referenced."""
    subprocess.run(["ip", "-n", ns, "link", "set", dev, "txqueuelen", "1000"], check=True)
    for args in (["qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
                 ["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                  "rate", "8bit", "burst", "1"],
                 ["qdisc", "add", "dev", dev, "parent", "1:1", "pfifo", "limit", "1000"]):
        subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True,
                       capture_output=True)


def test_records_of_deleted_entries_still_referenced_are_swept(topo, host):
    """A deleted entry whose packets are still queued stays in memory, out
    of the table (dying) until the last packet goes: no dump shows it, the
    table still counts it. Its record is pruned like an expired one's; the
    sweeper used to wait for it as a live connection (CI once saw 1,415
    records of a zone conntrack-tools had emptied, 20 s later)."""
    ns = topo.host_netns
    _hold_packets(ns)
    host.attach_index(max_records=4000)
    topo.send("udp", 4, 5, 300)
    conntrack_tool(ns, "-D", "-w", "5")
    assert listed(ns, 5) == []                                  # conntrack-tools
    assert host.table_count() >= 200                            # held: still counted
    deadline = time.monotonic() + 10
    while host._index().zone(5)["records"] > 64 and time.monotonic() < deadline:
        time.sleep(0.2)
    z = host._index().zone(5)
    assert z["records"] <= 64 and z["pruned"] >= 300 - 64, z   # the hook's tail window
    assert host.table_count() >= 200                            # still held meanwhile


def _record_ages(pin_dir, zone):
    """Seconds since each of a zone's published slots was stamped, by
    CLOCK_MONOTONIC now (the record map as the kernel holds it, by BTF)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                          os.path.join(pin_dir, "cti_records")],
                         capture_output=True, text=True, check=True).stdout
    now = time.clock_gettime(time.CLOCK_MONOTONIC)
    return [now - s["ts_sec"] for e in json.loads(out)
            if e["formatted"]["key"] >> 48 == zone
            for s in e["formatted"]["value"]["s"] if s["seq"]]


def test_records_are_stamped_by_the_monotonic_clock_with_or_without_the_sweeper(topo, host):
    """The hook stamps a record with the second the sweeper last wrote (a
    load, not a read of the clock) while that is fresh, and reads the clock
    when it is not: a stopped sweeper must not age new records."""
    pin_dir = host.attach_index(max_records=4000).pin_dir
    deadline = time.monotonic() + 5
    while _sweeper(pin_dir)["runs"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)                # its first runs set the clock
    sw = _sweeper(pin_dir)
    assert abs(time.clock_gettime(time.CLOCK_MONOTONIC) - sw["clock_sec"]) < 2, sw
    topo.send("udp", 4, 5, 200)
    ages = _record_ages(pin_dir, 5)
    assert len(ages) == 200 and all(-1 <= a < 3 for a in ages), ages
    _stop_sweeper(pin_dir)
    time.sleep(3)                     # its clock is stale at any HZ >= 100
    topo.send("udp", 4, 6, 200)
    ages = _record_ages(pin_dir, 6)
    assert len(ages) == 200 and all(-1 <= a < 3 for a in ages), ages


def test_the_sweeper_goes_with_the_index(topo, host):
    """Its timer runs while the index is pinned, and stops with it: no map
    of a detached index is left in the kernel."""
    pin_dir = host.attach_index().pin_dir
    sweeper_id = _map_info(pin_dir, "cti_sweeper")["id"]
    runs = _sweeper(pin_dir)["runs"]
    time.sleep(0.5)
    assert _sweeper(pin_dir)["runs"] > runs                # it runs
    assert host.attach_index().already_attached             # reopening starts no second one
    assert host.detach_index()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gone = subprocess.run(["bpftool", "map", "show", "id", str(sweeper_id)],
                              capture_output=True).returncode != 0
        if gone:
            break
        time.sleep(0.2)
    assert gone, "the sweeper's map outlived the index"


@pytest.mark.parametrize("preallocate", [False, True])
def test_hook_prunes_records_of_gone_entries(topo, host, preallocate):
    ns = topo.host_netns
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.netfilter.nf_conntrack_udp_timeout=1"], check=True)
    _stop_sweeper(host.attach_index(preallocate=preallocate).pin_dir)   # the hook alone
    topo.send("udp", 4, 5, 2000)
    assert host.index_status()["zones"][5]["records"] == 2000
    time.sleep(2.5)
    conntrack_tool(ns, "-L")          # a dump unlinks expired entries: they are freed
    assert listed(ns, 5) == []
    topo.send("udp", 4, 5, 2000, dport=30000)   # each new record prunes the zone's tail
    z = host._index().zone(5)
    assert z["pruned"] >= 1900, z
    assert z["records"] <= 2000 + 2 * 64, z
    assert host.index_audit()["missing"] == 0   # nothing live was dropped
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and host.count(Filter(zone=5)) == 0


def test_hook_looks_again_at_a_lasting_tail_in_the_next_second(topo, host):
    """The hook skips looking at a zone's oldest record for the rest of the
    second in which it found it alive, young and far from timing out (UDP
    timeout 30 s here). A delete by another tool ends those connections
    without the hook seeing it: from the next second on, it prunes them."""
    ns = topo.host_netns
    _stop_sweeper(host.attach_index().pin_dir)      # the hook alone
    topo.send("udp", 4, 5, 2000)
    conntrack_tool(ns, "-D", "-w", "5")
    assert listed(ns, 5) == []
    time.sleep(1.1)
    topo.send("udp", 4, 5, 2000, dport=30000)       # each new record prunes the zone's tail
    z = host._index().zone(5)
    assert z["pruned"] >= 1900, z
    assert host.index_audit()["missing"] == 0


def test_hook_prunes_records_of_expired_entries_before_the_gc_frees_them(topo, host):
    """Under churn conntrack's gc frees expired entries seconds late: their
    records are pruned when they expire (no dump here to free them), the
    table still counts them, and the count check allows for exactly those."""
    ns = topo.host_netns
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.netfilter.nf_conntrack_udp_timeout=1"], check=True)
    _stop_sweeper(host.attach_index().pin_dir)   # the hook alone
    topo.send("udp", 4, 5, 2000)
    time.sleep(2.5)                    # all expired; the gc may not have come by
    topo.send("udp", 4, 5, 2000, dport=30000)   # each new record prunes the zone's tail
    ix = host._index()
    z = ix.zone(5)
    assert z["pruned"] >= 1900, z
    assert z["records"] <= 2000 + 2 * 64, z
    pruned_expired = ix._ix.expired_recent()
    assert 0 <= pruned_expired <= z["pruned"]
    assert host.index_status()["blind_spot"] == ""
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index", res.reason
    assert listed(ns, 5) == []        # conntrack-tools: nothing of the zone is left
    assert host.index_audit()["missing"] == 0


def test_an_index_delete_reads_the_table_count_once(topo, host, monkeypatch):
    """The plan and the blind-spot check share one read of the table count."""
    from pyconntrack import _lowlevel as ll
    host.attach_index()
    topo.send("udp", 4, 5, 50)
    reads = []
    real = ll.table_count
    monkeypatch.setattr(ll, "table_count", lambda h: reads.append(1) or real(h))
    res = host.delete(Filter(zone=5))
    assert res.strategy == "index" and res.deleted == 50, res
    assert len(reads) == 1


def test_preallocating_more_than_half_the_available_memory_is_refused(topo, host, monkeypatch):
    monkeypatch.setattr(index_mod, "_mem_available", lambda: 1 << 19)   # 0.5 MiB left
    # 4096 records: 469 chunks of 1,736 B (59 full ones, two partly used
    # ones for each of 205 zones) and 512 + 1,024 buckets of 16 B, 0.80 MiB
    with pytest.raises(ConntrackError, match=r"would take 0\.8 MiB for 4096 records up front, "
                                             r"more than half of the 0\.5 MiB available") as exc:
        host.attach_index(max_records=4096, preallocate=True)
    assert exc.value.errno == 12
    assert host.index_status()["attached"] is False            # nothing made
    assert not host.attach_index(max_records=4096).already_attached   # on demand: fine


def test_an_index_of_another_record_layout_is_walked_around_then_replaced(topo, host):
    """What an upgrade finds: pins made by a version whose record map holds
    another value (here one of 56-byte records, the layout before chunks).
    Deletes must not fail: they walk; attach replaces that index."""
    ns = topo.host_netns
    pin_dir = host.attach_index(max_records=4096).pin_dir
    os.unlink(os.path.join(pin_dir, "cti_records"))
    subprocess.run(["bpftool", "map", "create", os.path.join(pin_dir, "cti_records"),
                    "type", "hash", "key", "8", "value", "56", "entries", "1024",
                    "name", "cti_records", "flags", "1"], check=True)
    topo.send("udp", 4, 5, 100)
    topo.send("udp", 4, 6, 20)
    with Conntrack(ns) as other:                    # another process, this version
        status = other.index_status()
        assert status["attached"] is False and "another version" in status["reason"]
        res = other.delete(Filter(zone=5))
        assert res.strategy != "index" and res.deleted == 100, res
        assert listed(ns, 5) == [] and len(listed(ns, 6)) == 20   # conntrack-tools
        r = other.attach_index()
        assert not r.already_attached
        assert _map_info(r.pin_dir, "cti_records")["bytes_value"] == 70 * 24
        topo.send("udp", 4, 5, 50)
        res = other.delete(Filter(zone=5))
        assert res.strategy == "index" and res.deleted == 50, res
        assert listed(ns, 5) == [] and len(listed(ns, 6)) == 20
        assert other.detach_index()


def test_records_of_the_attach_walk_are_aged_from_when_they_were_recorded(topo, host):
    """The pruner and the sweeper move a live record to the head only once
    it is old (300 s for the sweeper). Records of the attach walk count
    their age from the walk: the sweeper, which visits every zone within
    0.4 s, leaves them where they are. (They counted from 0 before: all were
    moved at the sweeper's first visit, and an audit reading the zone at
    that moment missed them.)"""
    topo.send("udp", 4, 5, 300)
    assert host.attach_index().seeded == 300
    pin_dir = host._index().dir
    runs = _sweeper(pin_dir)["runs"]
    deadline = time.monotonic() + 10
    while _sweeper(pin_dir)["runs"] < runs + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sweeper(pin_dir)["runs"] >= runs + 6            # every zone visited
    z = host._index().zone(5)
    assert z["moves"] == 0 and z["records"] == 300, z
    assert host.index_audit()["missing"] == 0
    assert len(listed(topo.host_netns, 5)) == 300           # conntrack-tools
