"""The main job on an embedded default: fill a scratch netns, clean zones with
every strategy and with conntrack-tools, print what each did and took, and
check each of them with counts that do not come from pyconntrack."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, TextIO, Tuple

from .. import netns as scratch_netns
from ..conntrack import Conntrack
from ..errors import ConntrackError, KernelUnsupported
from ..filter import Filter
from .progress import Progress

# (family, proto) mix of every zone: tcp/udp/icmp over IPv4 and IPv6
MIX = [("ipv4", "tcp"), ("ipv4", "udp"), ("ipv4", "icmp"),
       ("ipv6", "tcp"), ("ipv6", "udp"), ("ipv6", "icmpv6")]


class DemoFailed(ConntrackError):
    """A method the demo ran did not do what it said (or failed)."""


def fill(ct: Conntrack, entries: int, zones: int, progress: Progress,
         first_zone: int = 1, per_zone: Optional[Dict[int, int]] = None) -> int:
    """Spread ``entries`` over ``zones`` zones, each with the full MIX
    (``per_zone``, when given, receives how many each zone got)."""
    base = entries // zones
    created = 0
    for z in range(zones):
        zone = first_zone + z
        share = base + (1 if z < entries % zones else 0)
        made = 0
        for i, (family, proto) in enumerate(MIX):
            n = share // len(MIX) + (1 if i < share % len(MIX) else 0)
            if not n:
                continue
            # distinct sources per zone keep tuples unique across zones
            if family == "ipv4":
                src = f"10.{zone >> 8}.{zone & 0xff}.1"
            else:
                src = f"fd00:{zone:x}::1"
            made += ct.create_many(n, zone=zone, family=family, proto=proto, src=src,
                                   dport=443 if proto == "tcp" else 53)
            progress.advance(n)
        created += made
        if per_zone is not None:
            per_zone[zone] = made
    progress.finish()
    return created


class Checker:
    """Counts that do not come from pyconntrack: conntrack-tools in the netns
    (``conntrack -C``, ``conntrack -L``), else the netns' own
    nf_conntrack_count (then per-zone counts are not available)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.tools = shutil.which("conntrack") is not None
        self.source = "conntrack -C/-L" if self.tools else "nf_conntrack_count"

    def _run(self, argv: List[str]) -> str:
        # fixed argv, no shell
        p = subprocess.run(["ip", "netns", "exec", self.netns, *argv],
                           capture_output=True, text=True, check=False)
        if p.returncode:
            raise DemoFailed(f"{' '.join(argv)} in {self.netns} failed (exit {p.returncode}): "
                             f"{p.stderr.strip()[-300:]}")
        return p.stdout

    def total(self) -> int:
        if self.tools:
            return int(self._run(["conntrack", "-C"]).split()[0])
        return int(self._run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).split()[0])

    def per_zone(self, attempts: int = 3) -> Optional[Counter]:
        """Entries per zone from ``conntrack -L``. A kernel dump misses or
        repeats entries when the (machine-wide) hash table is resized while
        it runs, so a listing counts only if its total is ``conntrack -C``'s;
        else it is retried (the last one is returned, and then disagrees)."""
        if not self.tools:
            return None
        zones: Counter = Counter()
        for _ in range(attempts):
            zones = Counter()
            for line in self._run(["conntrack", "-L"]).splitlines():
                m = ZONE_RE.search(line)
                zones[int(m.group(1)) if m else 0] += 1
            if sum(zones.values()) == self.total():
                break
        return zones


ZONE_RE = re.compile(r"\bzone=(\d+)\b")


def _conntrack_tools(netns: str, zone: int) -> Optional[Tuple[float, int, str]]:
    """conntrack -D -w ZONE in the netns: (seconds, exit status, last stderr line)."""
    if not shutil.which("conntrack"):
        return None
    start = time.perf_counter()
    # fixed argv, no shell: the zone is an int we generated
    p = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-D", "-w", str(zone)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - start
    lines = p.stderr.strip().splitlines()
    return seconds, p.returncode, lines[-1] if lines else ""


def run(entries: int = 200_000, zones: int = 1000, out: Optional[TextIO] = None,
        progress: Optional[bool] = None) -> List[dict]:
    """Fill, clean zones every way, check each method with counts of its own
    (exit status, entries really gone, nothing else touched) and raise
    DemoFailed naming every method that failed a check."""
    import sys
    out = out or sys.stdout
    rows: List[dict] = []
    with scratch_netns.scratch("pct-demo") as ns, Conntrack(ns) as ct:
        caps = ct.capabilities()
        check = Checker(ns)
        out.write(f"scratch netns {ns}; kernel {caps.kernel}; probe: zone dump "
                  f"{'yes' if caps.dump_zone else 'no'}, zone flush "
                  f"{'yes' if caps.flush_zone else 'no'}; checked with {check.source}\n")
        sizes: Dict[int, int] = {}
        start = time.perf_counter()
        created = fill(ct, entries, zones, Progress(entries, "filling", enabled=progress),
                       per_zone=sizes)
        fill_s = time.perf_counter() - start
        out.write(f"created {created} entries in {zones} zones in {fill_s:.2f} s "
                  f"({created / fill_s:,.0f}/s)\n")
        total = check.total()
        if total != created:
            raise DemoFailed(f"{check.source} counts {total} entries after creating {created}")
        zone_ids = iter(range(1, zones + 1))
        cleaned_zones: List[int] = []   # zones a method cleaned (or should have)
        failed_zones: List[int] = []    # zones of a method that failed: reported above
        extra_lines: List[str] = []

        def measure(method: str, zs: List[int], action: Callable[[], Tuple[int, float, str]],
                    refusable: bool = False) -> None:
            """Run one method on zones ``zs`` and check it: what it reports,
            what the independent count says, and that nothing else changed."""
            expect = sum(sizes[z] for z in zs)
            before = check.total()
            problems: List[str] = []
            refused = ""
            try:
                deleted, seconds, note = action()
            except KernelUnsupported as exc:  # e.g. flush on an old kernel
                if not refusable:
                    raise
                deleted, seconds, note, refused = 0, 0.0, "", str(exc)
            except ConntrackError as exc:
                deleted, seconds, note = 0, 0.0, ""
                problems.append(f"error: {exc}")
            gone = before - check.total()
            if refused:
                note = f"refused: {refused}"
                if gone:
                    problems.append(f"refused, yet {gone} entries went away")
            else:
                (cleaned_zones if not problems else failed_zones).extend(zs)
                if deleted != expect:
                    problems.append(f"reported {deleted} deleted, the zones held {expect}")
                if gone != expect:
                    problems.append(f"{check.source}: {gone} entries went away, not {expect}")
            rows.append({"method": method, "zones": len(zs), "deleted": deleted,
                         "seconds": seconds, "note": note, "verified": gone,
                         "ok": not problems, "problems": problems})

        def pct_delete(z: int, strategy: str, handle: Conntrack = ct):
            r = handle.delete(Filter(zone=z), strategy=strategy)
            bad = f", {r.failed} failed (errno {r.errno})" if r.failed else ""
            return r.deleted, r.elapsed_s, r.strategy + bad

        for strategy in ("auto", "flush", "walk"):
            z = next(zone_ids)
            measure(f"pyconntrack {strategy}", [z],
                    lambda z=z, s=strategy: pct_delete(z, s), refusable=strategy == "flush")
        many = [next(zone_ids) for _ in range(10)]

        def delete_many():
            r = ct.delete_many([Filter(zone=z) for z in many])
            return r.deleted, r.elapsed_s, f"{r.walks} walk"
        measure("pyconntrack delete_many", many, delete_many)

        if caps.netfilter_bpf:
            start = time.perf_counter()
            attached = ct.attach_index(max_records=max(262144, int(entries * 1.25)))
            attach_s = time.perf_counter() - start
            try:
                # an agent's process meets an index attached before it started:
                # its first delete opens the index (loads the programs, reuses
                # the pinned maps); the next ones are warm
                def first_call(z: int):
                    # wall clock of the whole call: DeleteResult.elapsed_s
                    # starts after the index is open
                    start = time.perf_counter()
                    deleted, _, note = pct_delete(z, "index", agent)
                    return deleted, time.perf_counter() - start, note

                with Conntrack(ns) as agent:
                    z = next(zone_ids)
                    measure("pyconntrack index, 1st", [z], lambda: first_call(z))
                    z2 = next(zone_ids)
                    measure("pyconntrack index", [z2], lambda: pct_delete(z2, "index", agent))
                first, warm = rows[-2], rows[-1]
                first["note"] += " (1st call of a process, wall clock: opens the index)"
                warm["note"] += " (warm)"
            finally:
                ct.detach_index()
            extra_lines.append(f"index: attach + seed of {attached.seeded} entries "
                               f"{attach_s * 1000:.1f} ms (once per namespace); a process's "
                               f"first delete {first['seconds'] * 1000:.1f} ms (wall clock, "
                               f"opens the index); warm delete {warm['seconds'] * 1000:.1f} ms")
        else:
            rows.append({"method": "pyconntrack index", "zones": 0, "deleted": 0, "seconds": 0.0,
                         "note": f"unavailable: {caps.index_error}", "verified": 0, "ok": True,
                         "problems": []})

        z = next(zone_ids)
        if not check.tools:
            rows.append({"method": "conntrack -D -w", "zones": 0, "deleted": 0, "seconds": 0.0,
                         "note": "conntrack-tools not installed", "verified": 0, "ok": True,
                         "problems": []})
        else:
            def tools():
                before = check.total()
                seconds, status, last = _conntrack_tools(ns, z)
                if status != 0:
                    raise ConntrackError(f"conntrack -D -w {z} exited {status}: {last}")
                # conntrack-tools reports on stderr only; its own count is the total's drop
                return before - check.total(), seconds, "conntrack-tools"
            measure("conntrack -D -w", [z], tools)

        # every zone, independently counted: the cleaned ones empty, the others as created
        left = check.total()
        cleaned = sum(row["deleted"] for row in rows)
        expected_left = created - sum(row["verified"] for row in rows)
        by_zone = check.per_zone()
        outside: List[str] = []
        if left != expected_left:
            outside.append(f"{left} entries left, expected {expected_left}")
        if by_zone is not None:
            if sum(by_zone.values()) != left:
                outside.append(f"conntrack -L lists {sum(by_zone.values())} entries, "
                               f"conntrack -C counts {left}")
            for zone, n in sorted(sizes.items()):
                if zone in failed_zones:
                    continue
                want = 0 if zone in cleaned_zones else n
                if by_zone.get(zone, 0) != want:
                    outside.append(f"zone {zone}: {by_zone.get(zone, 0)} entries, expected {want}")
            for zone in sorted(set(by_zone) - set(sizes)):
                outside.append(f"zone {zone}: {by_zone[zone]} unexpected entries")

        out.write(f"\n{'method':<26} {'zones':>5} {'deleted':>8} {'ms':>9} {'ms/zone':>8}  "
                  f"check  note\n")
        for row in rows:
            per = row["seconds"] * 1000 / max(row["zones"], 1)
            verdict = "ok" if row["ok"] else "FAILED"
            out.write(f"{row['method']:<26} {row['zones']:>5} {row['deleted']:>8} "
                      f"{row['seconds'] * 1000:>9.1f} {per:>8.1f}  {verdict:<6} {row['note']}\n")
        for line in extra_lines:
            out.write(f"\n{line}\n")
        scope = "every zone counted" if by_zone is not None else "total only"
        out.write(f"\ntable: {created} before, {left} after, {cleaned} deleted; other zones "
                  f"{'intact' if not outside else 'CHANGED'} ({check.source}, {scope})\n")
        if failed_zones:
            out.write(f"zones of failed methods, not checked again: {sorted(failed_zones)}\n")
        failed = [f"{row['method']}: {'; '.join(row['problems'])}" for row in rows if not row["ok"]]
        if outside:
            failed.append("entries outside the cleaned zones: " + "; ".join(outside[:5]))
        for line in failed:
            out.write(f"FAILED {line}\n")
        if failed:
            raise DemoFailed(f"demo: {len(failed)} check(s) failed: " + " | ".join(failed))
    return rows
