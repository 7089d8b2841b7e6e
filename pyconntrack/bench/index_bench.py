"""Benchmarks of the eBPF zone index, each against its baseline in the same
run (scratch namespaces only):

- ``churn_share``: new UDP flows at a fixed rate over several zones with a
  short UDP timeout and no cleanups, then one cleanup per zone: the share the
  index served (strategy ``index``), what was left, and the records kept.
- ``setup_rate``: new-flow rate with the index attached against without
  (alternating runs; ratio of medians).
- ``attach_time``: attach (hooks + one walk) at 1M entries against the plain
  walk (count) of the same table.
"""
from __future__ import annotations

import statistics
import subprocess
import threading
import time
from typing import List

from ..conntrack import Conntrack
from ..filter import Filter
from ..testing.topology import Topology


def _sysctl(ns: str, key: str, value: int) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True)


def churn_share(seconds: float = 30.0, rate: int = 50_000, zones: int = 8,
                udp_timeout: int = 5, max_records: int = 0) -> dict:
    zs = list(range(10, 10 + zones))
    with Topology(zones=zs) as t:
        _sysctl(t.host_netns, "net.netfilter.nf_conntrack_udp_timeout", udp_timeout)
        _sysctl(t.host_netns, "net.netfilter.nf_conntrack_udp_timeout_stream", udp_timeout)
        with Conntrack(t.host_netns) as ct:
            ct.attach_index(max_records=max_records)
            try:
                errors: List[Exception] = []

                def send(zone: int) -> None:
                    try:
                        t.send("udp", 4, zone, int(rate / zones * seconds),
                               rate=rate / zones, duration=seconds, timeout=seconds * 4 + 60)
                    except Exception as exc:  # reported below
                        errors.append(exc)

                started = time.perf_counter()
                threads = [threading.Thread(target=send, args=(z,)) for z in zs]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                elapsed = time.perf_counter() - started
                if errors:
                    raise errors[0]
                status = ct.index_status()
                served, left, reasons = 0, 0, []
                for z in zs:
                    r = ct.delete(Filter(zone=z))
                    served += r.strategy == "index"
                    if r.strategy != "index":
                        reasons.append(r.reason)
                    left += ct.count(Filter(zone=z))
                zone_stats = [ct._index().zone(z) for z in zs] if ct._index() else []
                return {"seconds": round(elapsed, 1), "rate": rate, "zones": zones,
                        "udp_timeout": udp_timeout, "max_records": status["max_records"],
                        "records_after_churn": status["records"],
                        "dirty_zones": status["dirty_zones"],
                        "hook_pruned": sum(z["pruned"] for z in zone_stats),
                        "hook_moves": sum(z["moves"] for z in zone_stats),
                        "index_share": served / len(zs), "entries_left": left,
                        "fallback_reasons": reasons[:3]}
            finally:
                ct.detach_index()


def setup_rate(flows: int = 100_000, rounds: int = 5) -> dict:
    """New flows per second through the host namespace with and without the
    index (alternating; the hook runs only while attached)."""
    with_ix, without = [], []
    with Topology(zones=[5]) as t:
        with Conntrack(t.host_netns) as ct:
            try:
                for i in range(rounds * 2):
                    attached = i % 2 == 1
                    if attached:
                        ct.attach_index()
                    r = t.send("udp", 4, 5, flows, dport=1024 + (i % 40) * 1000)
                    (with_ix if attached else without).append(r["sent"] / r["seconds"])
                    if attached:
                        ct.detach_index()
                    ct.delete(Filter(zone=5), strategy="walk")
            finally:
                ct.detach_index()
    a, b = statistics.median(with_ix), statistics.median(without)
    return {"flows": flows, "rounds": rounds, "with_index_per_s": round(a),
            "without_per_s": round(b), "ratio": round(a / b, 3)}


def attach_time(entries: int = 1_000_000, rounds: int = 3) -> dict:
    """Attach (hooks + one walk) against a plain count walk of the same table."""
    from .harness import KernelLimits   # raises nf_conntrack_max for the run, restores it
    att, walk = [], []
    with KernelLimits(entries + entries // 4 + 100_000, None), Topology(zones=[5]) as t:
        with Conntrack(t.host_netns) as ct:
            ct.create_many(entries, zone=5, proto="udp", src="10.50.0.1")
            try:
                for _ in range(rounds):
                    s = time.perf_counter()
                    ct.count(Filter(zone=5))
                    walk.append(time.perf_counter() - s)
                    s = time.perf_counter()
                    ct.attach_index()
                    att.append(time.perf_counter() - s)
                    ct.detach_index()
            finally:
                ct.detach_index()
                ct.delete(Filter(zone=5), strategy="walk")
    a, w = statistics.median(att), statistics.median(walk)
    return {"entries": entries, "attach_s": round(a, 3), "walk_s": round(w, 3),
            "ratio": round(a / w, 2)}


def run_all(quick: bool = False) -> dict:
    if quick:
        return {"churn": churn_share(seconds=5, rate=10_000),
                "setup_rate": setup_rate(flows=20_000, rounds=2),
                "attach": attach_time(entries=20_000, rounds=2)}
    return {"churn": churn_share(), "setup_rate": setup_rate(), "attach": attach_time()}
