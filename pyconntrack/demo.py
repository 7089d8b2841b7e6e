"""The main job on an embedded default: fill a scratch netns, clean zones with
every strategy and with conntrack-tools, print what each did and took."""
from __future__ import annotations

import shutil
import subprocess
import time
from typing import List, Optional, TextIO

from . import netns as scratch_netns
from .conntrack import Conntrack
from .filter import Filter
from .progress import Progress

# (family, proto) mix of every zone: tcp/udp/icmp over IPv4 and IPv6
MIX = [("ipv4", "tcp"), ("ipv4", "udp"), ("ipv4", "icmp"),
       ("ipv6", "tcp"), ("ipv6", "udp"), ("ipv6", "icmpv6")]


def fill(ct: Conntrack, entries: int, zones: int, progress: Progress,
         first_zone: int = 1) -> int:
    """Spread ``entries`` over ``zones`` zones, each with the full MIX."""
    per_zone = entries // zones
    created = 0
    for z in range(zones):
        zone = first_zone + z
        share = per_zone + (1 if z < entries % zones else 0)
        for i, (family, proto) in enumerate(MIX):
            n = share // len(MIX) + (1 if i < share % len(MIX) else 0)
            if not n:
                continue
            # distinct sources per zone keep tuples unique across zones
            if family == "ipv4":
                src = f"10.{zone >> 8}.{zone & 0xff}.1"
            else:
                src = f"fd00:{zone:x}::1"
            created += ct.create_many(n, zone=zone, family=family, proto=proto, src=src,
                                      dport=443 if proto == "tcp" else 53)
            progress.advance(n)
    progress.finish()
    return created


def _conntrack_tools(netns: str, zone: int) -> Optional[float]:
    if not shutil.which("conntrack"):
        return None
    start = time.perf_counter()
    # fixed argv, no shell: the zone is an int we generated
    subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-D", "-w", str(zone)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def run(entries: int = 200_000, zones: int = 1000, out: Optional[TextIO] = None,
        progress: Optional[bool] = None) -> List[dict]:
    import sys
    out = out or sys.stdout
    rows: List[dict] = []
    with scratch_netns.scratch("pct-demo") as ns, Conntrack(ns) as ct:
        caps = ct.capabilities()
        out.write(f"scratch netns {ns}; kernel {caps.kernel}; probe: zone dump "
                  f"{'yes' if caps.dump_zone else 'no'}, zone flush "
                  f"{'yes' if caps.flush_zone else 'no'}\n")
        start = time.perf_counter()
        created = fill(ct, entries, zones, Progress(entries, "filling", enabled=progress))
        fill_s = time.perf_counter() - start
        out.write(f"created {created} entries in {zones} zones in {fill_s:.2f} s "
                  f"({created / fill_s:,.0f}/s)\n")
        total = ct.table_count()
        zone_ids = iter(range(1, zones + 1))

        def record(method: str, zs: List[int], deleted: int, seconds: float, note: str = ""):
            rows.append({"method": method, "zones": len(zs), "deleted": deleted,
                         "seconds": seconds, "note": note})

        for strategy in ("auto", "flush", "walk"):
            z = next(zone_ids)
            f = Filter(zone=z)
            try:
                r = ct.delete(f, strategy=strategy)
            except Exception as exc:  # e.g. flush refused on an old kernel
                record(f"pyconntrack {strategy}", [z], 0, 0.0, f"refused: {exc}")
                continue
            record(f"pyconntrack {strategy}", [z], r.deleted, r.elapsed_s, r.strategy)
        many = [next(zone_ids) for _ in range(10)]
        r = ct.delete_many([Filter(zone=z) for z in many])
        record("pyconntrack delete_many", many, r.deleted, r.elapsed_s, f"{r.walks} walk")
        if caps.netfilter_bpf:
            start = time.perf_counter()
            attached = ct.attach_index(max_records=max(262144, int(entries * 1.25)))
            attach_s = time.perf_counter() - start
            try:
                z = next(zone_ids)
                r = ct.delete(Filter(zone=z), strategy="index")
                record("pyconntrack index", [z], r.deleted, r.elapsed_s,
                       f"attach + seed of {attached.seeded} took {attach_s:.2f} s")
            finally:
                ct.detach_index()
        else:
            record("pyconntrack index", [], 0, 0.0, f"unavailable: {caps.index_error}")
        z = next(zone_ids)
        before = ct.table_count()
        seconds = _conntrack_tools(ns, z)
        if seconds is None:
            record("conntrack -D -w", [z], 0, 0.0, "conntrack-tools not installed")
        else:
            record("conntrack -D -w", [z], before - ct.table_count(), seconds,
                   "conntrack-tools")
        cleaned = sum(row["deleted"] for row in rows)
        left = ct.table_count()
        intact = left == total - cleaned
        out.write(f"\n{'method':<26} {'zones':>5} {'deleted':>8} {'ms':>9} {'ms/zone':>8}  note\n")
        for row in rows:
            per = row["seconds"] * 1000 / max(row["zones"], 1)
            out.write(f"{row['method']:<26} {row['zones']:>5} {row['deleted']:>8} "
                      f"{row['seconds'] * 1000:>9.1f} {per:>8.1f}  {row['note']}\n")
        out.write(f"\ntable: {total} before, {left} after, {cleaned} deleted; "
                  f"other zones {'intact' if intact else 'CHANGED'}\n")
        if not intact:
            raise RuntimeError("entries outside the cleaned zones changed")
    return rows
