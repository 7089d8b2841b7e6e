"""Benchmark workers (``python -m pyconntrack.bench.peers KIND NETNS``).

``pyconntrack bench`` runs every in-process method in a worker process of its
own, so that the worker's peak RSS is the method's own (not the harness's,
which holds matplotlib and the table builder) and the timings exclude the
harness's bookkeeping. A worker reads one JSON request per line on stdin and
answers one JSON line on stdout; each request is timed inside the worker
around the operation only.

Kinds:

- ``pct``: pyconntrack's public API (``Conntrack(netns)``).
- ``peer``: enters the namespace itself (setns), then
  - ``raw_flush``: the raw kernel zone flush, the floor of any walk-based
    method: one IPCTNL_MSG_CT_DELETE carrying CTA_ZONE (nfgenmsg version 1,
    family AF_UNSPEC), built here with ``struct`` on a plain netlink socket;
    only the send and the kernel's ack are timed;
  - ``raw_dump``: the raw kernel zone-filtered dump (IPCTNL_MSG_CT_GET,
    NLM_F_DUMP, CTA_ZONE), entries counted by header: the floor for
    ``pyconntrack count --zone``; send to NLMSG_DONE timed;
  - ``pyroute2``: pyroute2's ``Conntrack`` dump with the kernel zone filter,
    then one ``entry('del', tuple_orig=..., zone=Z)`` request per entry.
    (``Conntrack.delete(entry)`` drops the zone: the kernel then looks the
    tuple up in zone 0 and answers ENOENT; ``pitfall`` demonstrates it.)
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import socket
import struct
import sys
import time
from typing import Optional

CLONE_NEWNET = 0x40000000
NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLM_F_DUMP = 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_ZONE = 18

# what an optional dependency of the benchmarks is missing says (one line)
EXTRA_HINT = "pip install 'pyconntrack[bench]'"
PYROUTE2_MISSING = f"pyroute2 is needed for this peer: {EXTRA_HINT}"


def pyroute2_unusable() -> Optional[str]:
    """Why the pyroute2 peer cannot run here (None: it can). It dumps a
    zone, which pyroute2 does from 0.9.5 (Debian 12 ships 0.7.2, whose
    entries carry no zone at all)."""
    try:
        import inspect
        import pyroute2
        from pyroute2 import Conntrack
    except ImportError:
        return PYROUTE2_MISSING
    if "zone" not in inspect.signature(Conntrack.dump_entries).parameters:
        return (f"pyroute2 {getattr(pyroute2, '__version__', '?')} cannot dump a zone "
                f"(0.9.5 can): {EXTRA_HINT}")
    return None


def enter_netns(name: str) -> None:
    """setns(2) into /var/run/netns/NAME (Python 3.11 has no os.setns)."""
    path = name if name.startswith("/") else os.path.join("/var/run/netns", name)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class RawFlush:
    """One zone flush message on a plain netlink socket: the kernel's floor."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.seq = 0

    def message(self, zone: int) -> bytes:
        self.seq += 1
        # nfgenmsg: family AF_UNSPEC, version 1 (the kernel honours filters then), res_id 0
        body = struct.pack("=BBH", socket.AF_UNSPEC, 1, 0)
        body += struct.pack("=HH", 6, CTA_ZONE) + struct.pack("!H", zone) + b"\0\0"
        hdr = struct.pack("=IHHII", 16 + len(body),
                          (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                          NLM_F_REQUEST | NLM_F_ACK, self.seq, 0)
        return hdr + body

    def flush(self, zone: int) -> float:
        """Send one zone flush and wait for its ack; returns the round trip."""
        msg = self.message(zone)
        start = time.perf_counter()
        self.sock.send(msg)
        data = self.sock.recv(65536)
        elapsed = time.perf_counter() - start
        _length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data)
        if mtype != NLMSG_ERROR or seq != self.seq:
            raise OSError(0, f"unexpected netlink answer type {mtype} seq {seq}")
        (error,) = struct.unpack_from("=i", data, 16)
        if error:
            raise OSError(-error, f"zone flush: {os.strerror(-error)}")
        return elapsed


class RawDump:
    """One zone-filtered dump on a plain netlink socket: the kernel's floor
    for counting a zone (6.8+: CTA_ZONE in a dump). Entries are counted by
    their message headers, nothing is parsed."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.buf = bytearray(256 * 1024)
        self.seq = 0

    def message(self, zone: int) -> bytes:
        self.seq += 1
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
        body += struct.pack("=HH", 6, CTA_ZONE) + struct.pack("!H", zone) + b"\0\0"
        hdr = struct.pack("=IHHII", 16 + len(body),
                          (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                          NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0)
        return hdr + body

    def dump(self, zone: int) -> tuple:
        """(seconds from send to NLMSG_DONE, entries received)."""
        msg = self.message(zone)
        entries = 0
        start = time.perf_counter()
        self.sock.send(msg)
        while True:
            n = self.sock.recv_into(self.buf)
            off = 0
            while off + 16 <= n:
                length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", self.buf, off)
                if length < 16:
                    raise OSError(0, "bad netlink message length")
                if mtype == NLMSG_DONE:
                    return time.perf_counter() - start, entries
                if mtype == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", self.buf, off + 16)
                    raise OSError(-error, f"zone dump: {os.strerror(-error)}")
                entries += 1
                off += (length + 3) & ~3


class Pyroute2Cleaner:
    """What a pyroute2 user writes: dump with zone, delete each entry with zone."""

    def __init__(self) -> None:
        why = pyroute2_unusable()
        if why:
            raise ImportError(why)
        from pyroute2 import Conntrack
        # pyroute2 defaults to nfgen_family=AF_INET (IPv4 only): one socket per family
        self.sockets = [Conntrack(nfgen_family=socket.AF_INET),
                        Conntrack(nfgen_family=socket.AF_INET6)]

    def clean(self, zone: int, pairs: Optional[set] = None) -> int:
        deleted = 0
        for ct in self.sockets:
            entries = list(ct.dump_entries(zone=zone))
            for e in entries:
                # the kernel filtered by zone (6.8+); pyroute2 does not re-check
                # it. An entry without a zone is zone 0.
                if (getattr(e, "zone", None) or 0) != zone:
                    continue
                if pairs is not None and (str(e.tuple_orig.saddr),
                                          str(e.tuple_orig.daddr)) not in pairs:
                    continue
                ct.entry("del", tuple_orig=e.tuple_orig, zone=zone)
                deleted += 1
        return deleted

    def pitfall(self, zone: int) -> str:
        """Conntrack.delete(entry) on an entry of ``zone``: what happens."""
        for ct in self.sockets:
            for e in ct.dump_entries(zone=zone):
                if (getattr(e, "zone", None) or 0) != zone:
                    continue
                try:
                    ct.delete(e)
                except Exception as exc:  # NetlinkError(2) expected
                    return f"{type(exc).__name__}: {exc}"
                return "deleted (no pitfall on this version)"
        return "zone empty: not checked"

    def close(self) -> None:
        for ct in self.sockets:
            ct.close()


def _filters(specs):
    from ..filter import Filter
    return [Filter(**s) for s in specs]


def serve_pct(netns: str, request: dict) -> dict:
    global _CT
    from ..conntrack import Conntrack
    from ..filter import Filter
    if _CT is None:
        _CT = Conntrack(netns)
    ct = _CT
    op = request["op"]
    if op == "warmup":  # the probe (a throwaway netns) must not land in a timed call
        caps = ct.capabilities()
        return {"table_count": ct.table_count(), "flush_zone": caps.flush_zone}
    if op == "delete":  # one filter, one strategy
        start = time.perf_counter()
        r = ct.delete(Filter(**request["filter"]), strategy=request["strategy"])
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "deleted": r.deleted, "walks": r.walks,
                "strategy": r.strategy}
    if op == "delete_each_request":  # one delete call per filter (requests one by one)
        walks = deleted = 0
        start = time.perf_counter()
        for spec in request["filters"]:
            r = ct.delete(Filter(**spec), strategy=request["strategy"])
            walks += r.walks
            deleted += r.deleted
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "deleted": deleted, "walks": walks,
                "strategy": request["strategy"]}
    if op in ("delete_many", "delete_each"):
        fs = _filters(request["filters"])
        start = time.perf_counter()
        if op == "delete_many":
            # the walk: refills come through ctnetlink, which the index does not see
            r = ct.delete_many(fs, strategy=request.get("strategy", "walk"))
            seconds = time.perf_counter() - start
            return {"seconds": seconds, "deleted": r.deleted, "walks": r.walks,
                    "strategy": r.strategy}
        rs = ct.delete_each(fs, strategy=request.get("strategy", "walk"))
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "deleted": sum(r.deleted for r in rs),
                "walks": rs[0].walks if rs else 0,
                "strategy": rs[0].strategy if rs else "delete_each"}
    if op == "attach_index":  # the eBPF zone index, seeded by one walk
        if not hasattr(ct, "attach_index"):
            return {"attached": False, "reason": "Conntrack has no attach_index yet"}
        start = time.perf_counter()
        try:
            a = ct.attach_index(max_records=request["max_records"])
        except Exception as exc:
            return {"attached": False, "reason": f"{type(exc).__name__}: {exc}"}
        return {"attached": True, "seconds": time.perf_counter() - start,
                "seeded": getattr(a, "seeded", None), "lost": getattr(a, "lost", None)}
    if op == "detach_index":
        return {"detached": bool(ct.detach_index()) if hasattr(ct, "detach_index") else False}
    if op == "strategies":
        from .. import plan
        return {"strategies": list(plan.STRATEGIES)}
    raise ValueError(f"unknown pct op {op!r}")


def serve_peer(request: dict) -> dict:
    global _RAW, _P2
    op = request["op"]
    if op == "warmup":
        if _RAW is None:
            _RAW = RawFlush()
        try:
            if _P2 is None:
                _P2 = Pyroute2Cleaner()
            _P2.clean(65001)  # an empty zone: imports and sockets warmed up
        except ImportError:
            pass
        return {}
    if op == "raw_flush":
        if _RAW is None:
            _RAW = RawFlush()
        seconds = sum(_RAW.flush(z) for z in request["zones"])
        return {"seconds": seconds, "walks": len(request["zones"])}
    if op == "raw_dump":
        global _DUMP
        if _DUMP is None:
            _DUMP = RawDump()
        seconds, entries = _DUMP.dump(request["zone"])
        return {"seconds": seconds, "entries": entries, "walks": 1}
    if op in ("pyroute2", "pitfall"):
        if _P2 is None:
            _P2 = Pyroute2Cleaner()
        if op == "pitfall":
            return {"result": _P2.pitfall(request["zone"])}
        pairs = request.get("pairs")
        pairs = {tuple(p) for p in pairs} if pairs is not None else None
        start = time.perf_counter()
        deleted = sum(_P2.clean(z, pairs) for z in request["zones"])
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "deleted": deleted, "walks": 2 * len(request["zones"])}
    raise ValueError(f"unknown peer op {op!r}")


_CT = None
_RAW: Optional[RawFlush] = None
_DUMP: Optional[RawDump] = None
_P2: Optional[Pyroute2Cleaner] = None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    kind, netns = argv
    if kind == "peer":
        enter_netns(netns)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "rss":
                answer = {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
            elif kind == "pct":
                answer = serve_pct(netns, request)
            else:
                answer = serve_peer(request)
        except Exception as exc:  # reported to the harness, which decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
