"""Injected faults: receive-buffer overruns (ENOBUFS), a hash-table resize
during a walk, and a network namespace removed (or its name reused) while a
Conntrack is open. Each either recovers exactly (checked with kernel dumps)
or fails loudly with a typed error; never a silent partial.

Covered elsewhere, not repeated here: EPERM without CAP_NET_ADMIN and
non-root (test_cli.py::test_permission_denied_exit_3, ::test_permission_denied_api),
BPF refused (test_kernel_index.py::test_bpf_refused_gives_reason_and_rest_works),
index maps full (test_kernel_index.py::test_overflow_marks_zone_dirty_then_fallback_then_clean).
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import uuid

import pytest

from pyconntrack import (Conntrack, ConntrackError, Filter, NamespaceNotFound, cli,
                         conntrack as conntrack_mod)
from pyconntrack import _lowlevel as ll
from pyconntrack import index as index_mod
from pyconntrack import netns as scratch

from model import key

pytestmark = pytest.mark.kernel

HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"


def record(name, **values):
    from soak.figures import record as rec
    rec(name, **values)


def sockets():
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                out.add(int(fd))
        except OSError:
            pass
    return out


def set_rcvbuf(fds, size, force=False):
    """Resize the receive buffer of sockets the shim owns (through a dup:
    same socket). Returns the sizes the kernel settled on."""
    got = []
    for fd in fds:
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.setsockopt(socket.SOL_SOCKET, 33 if force else socket.SO_RCVBUF, size)  # 33: FORCE
            got.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        finally:
            s.close()
    return got


def snapshot(ct, f=None):
    return {(key(e), e.id) for e in ct.dump(f)}


# -- ENOBUFS -------------------------------------------------------------------------

def test_enobufs_on_command_socket_fails_loudly_then_recovers(netns):
    """The command socket gets one message per failed request; when they
    overflow its receive buffer the outcome of the batch is unknown: the shim
    must raise ENOBUFS (not report a partial count as success), and the handle
    must work exactly afterwards."""
    before_fds = sockets()
    ct = Conntrack(netns)
    try:
        fds = sorted(sockets() - before_fds)
        assert len(fds) == 2, fds
        ct.create_many(3000, zone=5, proto="udp", src="10.5.0.1")
        ct.create_many(400, zone=6, proto="tcp", src="10.6.0.1")
        zone5 = list(ct.dump(Filter(zone=5)))
        keep = snapshot(ct, Filter(zone=6))
        assert ct.delete_entries(zone5[:2000]).deleted == 2000
        live = zone5[2000:]                        # 1000 still there
        gone = zone5[:2000] * 2                    # 4000 requests that fail with ENOENT
        sizes = set_rcvbuf(fds, 1)                 # the kernel's minimum
        with pytest.raises(ConntrackError) as info:
            ct.delete_entries(live[:500] + gone + live[500:])
        assert info.value.errno == errno.ENOBUFS, info.value
        assert "No buffer space" in str(info.value)
        # the shim stopped at the overrun: the requests sent before it ran (and
        # succeeded), nothing after it was sent, nothing else was touched
        assert {(key(e), e.id) for e in ct.dump(Filter(zone=5))} == \
            {(key(e), e.id) for e in live[500:]}
        assert snapshot(ct, Filter(zone=6)) == keep
        # the same handle, with a small buffer still and stale error messages
        # queued: a retry is exact
        r = ct.delete(Filter(zone=5), strategy="walk")
        assert (r.matched, r.deleted, r.failed) == (500, 500, 0), r
        set_rcvbuf(fds, 8 << 20, force=True)
        r = ct.delete_entries(live[:10])
        assert (r.deleted, r.already_gone, r.failed) == (0, 10, 0)
        assert ct.table_count() == 400 and snapshot(ct, Filter(zone=6)) == keep
        r = ct.delete(Filter(zone=6, proto="tcp"), strategy="walk")
        assert (r.deleted, r.failed) == (400, 0) and ct.table_count() == 0
        record("enobufs command socket", rcvbuf_bytes=sizes[0], failing_requests=len(gone),
               result="ConntrackError ENOBUFS, handle exact afterwards")
    finally:
        ct.close()


def test_dump_with_tiny_receive_buffer_is_exact(ct):
    """ctnetlink dumps do not overrun: the kernel fills the next skb only when
    the reader made room. count, dump and a walk delete stay exact with the
    smallest receive buffer."""
    ct.create_many(20000, zone=5, proto="udp", src="10.5.0.1")
    ct.create_many(5000, zone=6, proto="tcp", src="10.6.0.1")
    expect5 = snapshot(ct, Filter(zone=5))
    keep6 = snapshot(ct, Filter(zone=6))
    kflags = conntrack_mod._kflags(ct.capabilities())
    before = sockets()
    h = ll.Handle(ct._path, ct.netns)
    try:
        sizes = set_rcvbuf(sorted(sockets() - before), 1)
        assert ll.count(h, Filter(zone=5), kflags) == 20000
        assert ll.count(h, Filter(), kflags) == 25000
        got = {(key(e), e.id) for e in ll.dump(h, Filter(zone=5), kflags)}
        assert got == expect5
        r = ll.delete_walk(h, [Filter(zone=5)], kflags, False, True)
        assert (r["matched"], r["deleted"], r["failed"]) == (20000, 20000, 0)
    finally:
        h.close()
    assert ct.count(Filter(zone=5)) == 0 and snapshot(ct, Filter(zone=6)) == keep6
    record("dump with tiny rcvbuf", rcvbuf_bytes=sizes[0], entries=25000,
           result="count, dump and walk exact")


# -- a hash-table resize during a walk ----------------------------------------------------

def test_resize_detected_walk_repeats(ct, monkeypatch):
    """The library's rule, without touching the kernel's table size: when
    nf_conntrack_buckets changed across a walk, the walk runs again (at most
    MAX_RESIZE_REWALKS more times) and the counts add up."""
    ct.create_many(300, zone=5)
    ct.create_many(50, zone=6)
    seq = iter([1000, 2000, 2000])
    monkeypatch.setattr(conntrack_mod, "_buckets", lambda: next(seq, 2000))
    r = ct.delete(Filter(zone=5), strategy="walk")
    assert (r.walks, r.deleted, r.failed, r.matched) == (2, 300, 0, 300)
    assert "resized" in r.reason
    ct.create_many(100, zone=5)
    n = iter(range(10 ** 6))
    monkeypatch.setattr(conntrack_mod, "_buckets", lambda: next(n))   # always changing
    r = ct.delete(Filter(zone=5), strategy="walk")
    assert r.walks == 1 + conntrack_mod.MAX_RESIZE_REWALKS and r.deleted == 100
    r = ct.delete(Filter(zone=6), dry_run=True)
    assert r.matched == 50 and ct.count(Filter(zone=6)) == 50   # dry run: last walk's count


def _read(path):
    with open(path) as f:
        return int(f.read())


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def resize_during_walk(ct, entries, rounds, raw=False):
    """Fill zone 5 with ``entries`` (and zone 6 as the bystander), resize the
    host-wide hash table once while a zone-5 walk delete runs, then check:
    zone 5 empty, zone 6 untouched. ``raw``: the shim's single walk without
    the library's re-walk (to show what a resize does to a dump)."""
    original = _read(HASHSIZE)
    kflags = conntrack_mod._kflags(ct.capabilities())
    figures = []
    try:
        for i in range(rounds):
            ct.create_many(entries, zone=5, proto="udp", src="10.5.0.1")
            ct.create_many(2000, zone=6, proto="tcp", src="10.6.0.1")
            keep6 = snapshot(ct, Filter(zone=6))
            t0 = time.perf_counter()
            ct.delete(Filter(zone=5), dry_run=True)
            walk_s = time.perf_counter() - t0
            go = threading.Event()
            done = {}

            def resize():
                go.wait()
                time.sleep(walk_s * 0.4)
                t = time.perf_counter()
                _write(HASHSIZE, original * 2 if i % 2 == 0 else original)
                done["resize_s"] = time.perf_counter() - t

            th = threading.Thread(target=resize)
            th.start()
            go.set()
            t0 = time.perf_counter()
            if raw:
                r = ll.delete_walk(ct._h(), [Filter(zone=5)], kflags, False, True)
                walks = r["walks"]
            else:
                res = ct.delete(Filter(zone=5), strategy="walk")
                walks, r = res.walks, res.to_dict()
            elapsed = time.perf_counter() - t0
            th.join()
            left = ct.count(Filter(zone=5))
            figures.append({"entries": entries, "walk_s": round(elapsed, 3), "walks": walks,
                            "deleted": r["deleted"], "left_in_zone": left,
                            "resize_s": round(done.get("resize_s", 0), 3)})
            if not raw:
                assert left == 0, figures[-1]
                assert r["failed"] == 0
            assert snapshot(ct, Filter(zone=6)) == keep6, "zone 6 was touched"
            ct.delete(Filter(zone=5), strategy="walk")
            ct.delete(Filter(zone=6), strategy="walk")
    finally:
        if _read(HASHSIZE) != original:
            _write(HASHSIZE, original)
    assert _read(HASHSIZE) == original
    return figures


@pytest.mark.skipif(not os.access(HASHSIZE, os.W_OK), reason="nf_conntrack hashsize not writable")
def test_resize_during_walk_leaves_nothing(ct):
    """A real resize (global hashsize, restored) during a 60k-entry walk: the
    library's walk re-runs, nothing of the zone survives, the bystander zone
    is untouched. The raw single walk's survivors are recorded, not asserted."""
    lib = resize_during_walk(ct, 60000, rounds=2)
    raw = resize_during_walk(ct, 60000, rounds=2, raw=True)
    record("resize during walk (short)", library=lib, raw_single_walk=raw)


# -- the namespace removed, or its name reused ------------------------------------------

def test_netns_removed_mid_operation():
    """ip netns del only unmounts the name; an open Conntrack keeps working on
    the namespace it opened (a held fd and its sockets keep it alive); a
    new Conntrack by name gets NamespaceNotFound; the CLI exits 2; a dump
    running across the removal completes."""
    name = f"pct-gone-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    scratch.create(name)
    try:
        ct = Conntrack(name)
        ct.create_many(3000, zone=5, proto="udp")
        ct.create_many(10, zone=6, proto="tcp")
        full = snapshot(ct)
        gen = ct.dump()
        first = [next(gen) for _ in range(10)]
        scratch.remove(name)
        assert not os.path.exists(f"/var/run/netns/{name}")
        rest = list(gen)
        assert {(key(e), e.id) for e in first + rest} == full
        assert ct.count(Filter(zone=5)) == 3000 and snapshot(ct) == full
        assert ct.delete(Filter(zone=5)).deleted == 3000
        assert ct.create_many(5, zone=7) == 5 and ct.table_count() == 15
        with pytest.raises(NamespaceNotFound):
            Conntrack(name)
        assert cli.main(["count", "--netns", name]) == 2
        # the name reused by a new namespace: the open Conntrack stays on its own
        scratch.create(name)
        with Conntrack(name) as fresh:
            assert fresh.table_count() == 0
            fresh.create_many(2, zone=9)
            assert ct.table_count() == 15 and ct.count(Filter(zone=9)) == 0
            assert len(list(ct.dump())) == 15
            assert fresh.table_count() == 2
        ct.close()
        with pytest.raises(ConntrackError, match="closed"):
            list(ct.dump())
    finally:
        scratch.remove(name)


def test_netns_removed_with_index_attached():
    """The index's links outlive a deleted namespace name: an open Conntrack
    must still report, use and detach it (pins gone afterwards)."""
    from pyconntrack.testing.topology import Topology
    ok, _, reason = index_mod.availability()
    if not ok:
        pytest.skip(reason)
    with Topology(zones=[5, 6]) as topo:
        host = Conntrack(topo.host_netns)
        try:
            r = host.attach_index()
            topo.send("udp", 4, 5, 500)
            topo.send("udp", 4, 6, 100)
            scratch.remove(topo.host_netns)   # ip netns del, Conntrack still open
            st = host.index_status()
            assert st["attached"] and st["zones"][5]["records"] >= 500
            res = host.delete(Filter(zone=5))
            assert res.deleted == 500 and res.failed == 0
            assert host.count(Filter(zone=6)) == 100
            assert host.detach_index()
            assert not os.path.exists(r.pin_dir)
        finally:
            try:
                host.detach_index()
            finally:
                host.close()


def test_cli_netns_not_a_namespace_exit_2(tmp_path):
    """Existing paths that are not network namespaces (a file, another kind of
    namespace, a FIFO that would block an open) are invalid input."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in ("/etc/hostname", "/proc/self/ns/uts", "/dev/null", str(fifo), str(tmp_path)):
        assert cli.main(["count", "--netns", path]) == 2, path
