"""pyconntrack bench: pyconntrack against its peers and the kernel's floor.

Every table is built in a scratch network namespace this command creates and
always removes (pyconntrack.netns.scratch); the machine's own conntrack table
is never read, flushed or filled. For tables beyond the global
``net.netfilter.nf_conntrack_max`` the limit (and, with ``--buckets``, the
hash size) is raised for the run and restored afterwards, also on Ctrl-C and
SIGTERM.

For each table size one table is built (``--zones`` zones, every zone a mix of
tcp/udp/icmp over IPv4 and IPv6, one zone holding a device talking to 200
remote IPs) and, on that same table, every method cleans the same kind of
target; the table is refilled after each measurement so every measurement sees
the full table. Each figure is the median of ``--reps`` repetitions with
min/max, and every ratio is to the raw kernel zone flush measured on the same
table in the same run (the floor of any walk-based method).

Scenarios:
- ``zone``: one whole zone.
- ``remote50``: in one zone, the entries between the device IP and 50 given
  remote IPs, both directions (what Neutron does on a security-group change).
- ``zones100``: 100 queued requests, each "delete zone Z", for 100 zones.

Methods that issue one request or process per target (Neutron's way,
conntrack-tools per zone, pyconntrack/pyroute2 one request at a time) are
sampled when the whole series would exceed ``--budget`` seconds: at least
five of them run, and the total is extrapolated linearly (each is an
independent full-table walk); the output says so. ``--full-peers`` runs all.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from .. import netns as scratch_netns
from ..conntrack import Conntrack
from ..errors import ConntrackError, InvalidFilter
from ..filter import Filter
from .progress import Progress
from .peers import EXTRA_HINT, pyroute2_unusable

SYSCTL_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
SYSCTL_BUCKETS = "/proc/sys/net/netfilter/nf_conntrack_buckets"
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"

MIX = [("ipv4", "tcp"), ("ipv4", "udp"), ("ipv4", "icmp"),
       ("ipv6", "tcp"), ("ipv6", "udp"), ("ipv6", "icmpv6")]
DEVICE_IP = "10.250.0.10"       # the port's fixed IP in the remote-IP zone
REMOTES = 200                   # remote IPs the device talks to
TARGET_REMOTES = 50             # remote IPs whose entries are cleaned
PER_REMOTE = 2                  # entries per remote IP and direction
MANY_ZONES = 100                # requests in the queued-requests scenario
MIN_SAMPLE = 5                  # sampled series run at least this many requests
BULK_ZONE = 65000               # zone of the one-shot bulk-create measurement
FIXED_ZONE_ENTRIES = 244        # zones of this size exist at every table size: the
FIXED_ZONES = 4                 # index's cost for the same zone, whatever the table

DEFAULT_SIZES = [10_000, 100_000, 1_000_000]
QUICK = dict(sizes=[5_000, 20_000], zones=1024, reps=2, budget=4.0, bulk=20_000)

SCENARIOS = {
    "zone": "one whole zone",
    "remote50": f"zone + {TARGET_REMOTES} remote IPs (both directions)",
    "zones100": f"{MANY_ZONES} queued requests across {MANY_ZONES} zones",
}


# --------------------------------------------------------------------------- args

def _size(text: str) -> int:
    t = text.strip().lower().replace("_", "")
    mult = 1
    if t.endswith("k"):
        mult, t = 1_000, t[:-1]
    elif t.endswith("m"):
        mult, t = 1_000_000, t[:-1]
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise InvalidFilter(f"invalid table size {text!r}") from None
    if n < 1_000 or n > 4_000_000:
        raise InvalidFilter(f"table size {text!r} out of range (1k..4M)")
    return n


def _human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="benchmark against peers and the kernel floor (scratch netns)",
                       description="Time pyconntrack, the raw kernel zone flush, conntrack-tools, "
                                   "pyroute2 and Neutron's way on the same tables in scratch "
                                   "network namespaces. Markdown on stdout, JSON/PNG/markdown "
                                   "files under --out.")
    p.add_argument("--quick", action="store_true",
                   help="small tables, 2 repetitions (the smoke test; under 2 minutes)")
    p.add_argument("--sizes", help="table sizes, e.g. 10k,100k,1M (default 10k,100k,1M)")
    p.add_argument("--zones", type=int, help="zones in each table (default 4096)")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 3)")
    p.add_argument("--budget", type=float,
                   help="seconds a per-request series may take before it is sampled (default 30)")
    p.add_argument("--full-peers", action="store_true",
                   help="never sample: run every request/process of every series")
    p.add_argument("--methods", help="only these method ids (comma separated; see --list)")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--buckets", type=int,
                   help="set the conntrack hash size for the run (restored afterwards)")
    p.add_argument("--out", help="write results.json, results.md and results.png into DIR")
    p.add_argument("--no-plot", action="store_true",
                   help="skip the PNG (without matplotlib it is skipped anyway, saying so)")
    p.add_argument("--progress", action="store_true", default=None,
                   help="progress bars even when stderr is not a terminal")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of markdown")
    p.add_argument("--from-json", metavar="FILE",
                   help="no run: re-render markdown (and, with --out, the files) from a results.json")
    p.add_argument("--startup-only", action="store_true",
                   help="only the CLI start-up section (end-to-end CLI latency, probe cache)")
    p.add_argument("--no-startup", action="store_true",
                   help="skip the CLI start-up section")
    p.add_argument("--index", action="store_true",
                   help="only the eBPF index figures (bench/index_bench.py): setup-rate overhead, "
                        "share served under churn, attach time, each against its baseline")
    p.add_argument("--no-index", action="store_true",
                   help="skip the eBPF index figures a full run ends with")
    p.add_argument("--debug", action="store_true")


# ------------------------------------------------------------------ kernel limits

def _read(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _write(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class KernelLimits:
    """Raise nf_conntrack_max (and optionally the hash size) for the run and
    restore both on exit, whatever ends the run (exception, Ctrl-C, SIGTERM)."""

    def __init__(self, needed_max: int, buckets: Optional[int]) -> None:
        self.needed_max = needed_max
        self.buckets = buckets
        self.saved: Dict[str, int] = {}
        self._old_term = None

    def __enter__(self) -> "KernelLimits":
        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, on_term)
        try:
            cur = _read(SYSCTL_MAX)
            if cur is not None and 0 < cur < self.needed_max:
                self.saved[SYSCTL_MAX] = cur
                _write(SYSCTL_MAX, self.needed_max)
            if self.buckets:
                cur_b = _read(HASHSIZE)
                if cur_b is not None and cur_b != self.buckets:
                    self.saved[HASHSIZE] = cur_b
                    _write(HASHSIZE, self.buckets)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        errors = []
        for path in (HASHSIZE, SYSCTL_MAX):
            if path in self.saved:
                try:
                    _write(path, self.saved[path])
                except OSError as e:  # never silent: the operator must know
                    errors.append(f"{path}: {e}")
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None
        if errors:
            sys.stderr.write("pyconntrack bench: could not restore " + "; ".join(errors) + "\n")

    def restored(self) -> Dict[str, int]:
        return {os.path.basename(k): v for k, v in self.saved.items()}


# ------------------------------------------------------------------------ workers

class Worker:
    """A ``python -m pyconntrack.bench.peers KIND NETNS`` child speaking JSON lines."""

    def __init__(self, kind: str, netns: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyconntrack.bench.peers", kind, netns],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, **request) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise ConntrackError(f"bench worker {self.kind} died (exit {self.proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise ConntrackError(f"{self.kind} worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------- tables

def _zone_src(zone: int, family: str) -> str:
    return f"10.{zone >> 8}.{zone & 0xFF}.1" if family == "ipv4" else f"fd00:{zone:x}::1"


def remote_ip(i: int) -> str:
    i %= REMOTES   # remotes REMOTES.. are the same IPs in the index's copy of the zone
    return f"198.18.{i // 250}.{i % 250 + 1}"


class Table:
    """The table of one size: what each zone holds, to fill and refill it."""

    def __init__(self, size: int, zones: int, fixed_zones: int = FIXED_ZONES) -> None:
        self.size = size
        self.zones = zones
        self.remote_zone = zones                      # the last zone
        self.std_zones = list(range(1, zones))        # every other zone
        # zones of a fixed size, carved out of the table's size budget
        self.fixed_zones = list(range(zones + 1, zones + 1 + fixed_zones))
        # a copy of the remote-IP zone for the index method: remotes
        # REMOTES..2*REMOTES-1 live there, so its targets are never refilled ones
        self.remote_ix_zone = zones + 1 + fixed_zones
        remote_entries = 2 * REMOTES * 2 * PER_REMOTE
        rest = max(size - remote_entries - fixed_zones * FIXED_ZONE_ENTRIES, 0)
        self.zone_specs: Dict[int, List[dict]] = {}
        n = len(self.std_zones)
        for k, z in enumerate(self.std_zones):
            self.zone_specs[z] = self._mix(z, rest // n + (1 if k < rest % n else 0))
        for z in self.fixed_zones:
            self.zone_specs[z] = self._mix(z, FIXED_ZONE_ENTRIES)
        self.remote_specs: Dict[int, List[dict]] = {}
        for r in range(2 * REMOTES):
            ip = remote_ip(r)
            rz = self.zone_of_remote(r)
            self.remote_specs[r] = [
                # ingress: the remote connects to the device
                dict(count=PER_REMOTE, zone=rz, proto="tcp", src=ip,
                     dst=DEVICE_IP, sport=40000, dport=22),
                # egress: the device connects to the remote
                dict(count=PER_REMOTE, zone=rz, proto="udp", src=DEVICE_IP,
                     dst=ip, sport=40000, dport=53),
            ]

    def zone_of_remote(self, r: int) -> int:
        return self.remote_zone if r < REMOTES else self.remote_ix_zone

    @staticmethod
    def _mix(z: int, total: int) -> List[dict]:
        specs = []
        for i, (family, proto) in enumerate(MIX):
            c = total // len(MIX) + (1 if i < total % len(MIX) else 0)
            if c:
                specs.append(dict(count=c, zone=z, family=family, proto=proto,
                                  src=_zone_src(z, family),
                                  dport=443 if proto == "tcp" else 53))
        return specs

    def entries(self, zones: Sequence[int] = (), remotes: Sequence[int] = ()) -> int:
        return (sum(s["count"] for z in zones for s in self.zone_specs[z])
                + sum(s["count"] for r in remotes for s in self.remote_specs[r]))

    def all_specs(self) -> List[dict]:
        out = [s for z in self.std_zones + self.fixed_zones for s in self.zone_specs[z]]
        out += [s for r in range(2 * REMOTES) for s in self.remote_specs[r]]
        return out

    def fill(self, netns: str, progress: Progress) -> int:
        """Create every entry, split over the cores (one socket each)."""
        specs = self.all_specs()
        workers = max(1, min(os.cpu_count() or 1, 4))
        lock = threading.Lock()
        created = [0] * workers
        errors: List[BaseException] = []

        def work(i: int) -> None:
            try:
                with Conntrack(netns) as ct:
                    for s in specs[i::workers]:
                        spec = dict(s)
                        n = ct.create_many(spec.pop("count"), **spec)
                        created[i] += n
                        with lock:
                            progress.advance(n)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        progress.finish()
        if errors:
            raise errors[0]
        return sum(created)

    def refill(self, ct: Conntrack, zones: Sequence[int] = (),
               remotes: Sequence[int] = ()) -> None:
        for z in zones:
            for s in self.zone_specs[z]:
                spec = dict(s)
                ct.create_many(spec.pop("count"), **spec)
        for r in remotes:
            for s in self.remote_specs[r]:
                spec = dict(s)
                ct.create_many(spec.pop("count"), **spec)


# ------------------------------------------------------------------------ methods

class Target:
    """What one measurement cleans: zones, or remote IPs in the remote zone."""

    def __init__(self, zones: Sequence[int] = (), remotes: Sequence[int] = ()) -> None:
        self.zones = list(zones)
        self.remotes = list(remotes)


class Step:
    """One timed unit of a method: returns (seconds, walks) and which part of
    the target it cleaned (so a sampled series is verified and refilled)."""

    def __init__(self, run: Callable[[], tuple], zones=(), remotes=()) -> None:
        self.run = run
        self.zones = list(zones)
        self.remotes = list(remotes)


class Method:
    def __init__(self, mid: str, scenario: str, label: str, kind: str,
                 steps: Callable[["Bench", Target], List[Step]], series: bool = False,
                 note: str = "", group: int = 1) -> None:
        self.id = mid
        self.scenario = scenario
        self.label = label
        self.kind = kind          # floor | pyconntrack | peer
        self.steps = steps
        self.series = series      # one request/process per target part: may be sampled
        self.note = note
        self.group = group        # a sample stops only at a multiple of this many steps
        self.skip = ""            # reason this run cannot measure it


def _proc(argv: List[str]) -> Callable[[], tuple]:
    def run() -> tuple:
        start = time.perf_counter()
        # fixed argv, no shell; stdout is the deleted entries, not wanted
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return time.perf_counter() - start, 1, ""

    return run


def _call(worker_get: Callable[[], Worker], **request) -> Callable[[], tuple]:
    def run() -> tuple:
        a = worker_get().call(**request)
        return a["seconds"], a.get("walks", 0), a.get("strategy", "")
    return run


def _pairs(remotes: Sequence[int]) -> List[List[str]]:
    out = []
    for r in remotes:
        out.append([remote_ip(r), DEVICE_IP])
        out.append([DEVICE_IP, remote_ip(r)])
    return out


def _remote_filters(zone: int, remotes: Sequence[int]) -> List[dict]:
    return [dict(zone=zone, src=s, dst=d) for s, d in _pairs(remotes)]


def build_methods() -> List[Method]:
    M: List[Method] = []

    def add(*a, **k) -> None:
        M.append(Method(*a, **k))

    # -- one whole zone
    add("floor", "zone", "kernel zone flush (floor)", "floor",
        lambda b, t: [Step(_call(b.peer, op="raw_flush", zones=t.zones), zones=t.zones)],
        note="one IPCTNL_MSG_CT_DELETE with CTA_ZONE; send + ack timed")
    add("pct-flush", "zone", "pyconntrack delete strategy=flush", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete", filter=dict(zone=t.zones[0]),
                                 strategy="flush"), zones=t.zones)])
    add("pct-walk", "zone", "pyconntrack delete strategy=walk", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete", filter=dict(zone=t.zones[0]),
                                 strategy="walk"), zones=t.zones)])
    add("pct-index", "zone", "pyconntrack delete strategy=index", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete", filter=dict(zone=t.zones[0]),
                                 strategy="index"), zones=t.zones)])
    add("pct-index-fixed", "zone",
        f"pyconntrack delete strategy=index, zone of {FIXED_ZONE_ENTRIES} at every size",
        "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete", filter=dict(zone=t.zones[0]),
                                 strategy="index"), zones=t.zones)],
        note="same zone size at every table size: is the index flat in table size?")
    add("conntrack-tools", "zone", "conntrack -D -w Z", "peer",
        lambda b, t: [Step(_proc([*b.enter, "conntrack", "-D", "-w",
                                  str(t.zones[0])]), zones=t.zones)],
        note="one process: full-table dump, zone matched in userspace, one delete+ack each")
    add("pyroute2", "zone", "pyroute2 dump(zone) + entry('del', zone)", "peer",
        lambda b, t: [Step(_call(b.peer, op="pyroute2", zones=t.zones), zones=t.zones)],
        note="dump per family with the kernel zone filter, one request per entry")

    # -- zone + 50 remote IPs
    add("pct-delete_many", "remote50", "pyconntrack delete_many (100 filters)", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete_many",
                                 filters=_remote_filters(b.table.remote_zone, t.remotes)),
                           remotes=t.remotes)],
        note="one walk for zone + src/dst pairs, both directions")
    add("pct-delete_each", "remote50", "pyconntrack delete_each (100 filters)", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete_each",
                                 filters=_remote_filters(b.table.remote_zone, t.remotes)),
                           remotes=t.remotes)],
        note="one walk, a result per filter")
    add("pct-delete_each-index", "remote50", "pyconntrack delete_each (100 filters), index",
        "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete_each", strategy="index",
                                 filters=_remote_filters(b.table.remote_ix_zone, t.remotes)),
                           remotes=t.remotes)],
        note="the eBPF zone index: the zone's records read once, no walk")
    add("neutron", "remote50", "Neutron: conntrack -D per IP and direction", "peer",
        lambda b, t: [Step(_proc([*b.enter, "conntrack", "-D", "-f", "ipv4",
                                  flag_dev, DEVICE_IP, "-w", str(b.table.remote_zone),
                                  flag_rem, remote_ip(r)]), remotes=[r] if i else [])
                      for r in t.remotes
                      for i, (flag_dev, flag_rem) in enumerate((("-d", "-s"), ("-s", "-d")))],
        series=True, group=2,
        note="IpConntrackManager: one process per remote IP and direction (100)")
    add("pyroute2-remote", "remote50", "pyroute2 dump(zone) + match + entry('del', zone)",
        "peer",
        lambda b, t: [Step(_call(b.peer, op="pyroute2", zones=[b.table.remote_zone],
                                 pairs=_pairs(t.remotes)), remotes=t.remotes)],
        note="one zone dump per family, src/dst matched in Python")

    # -- 100 queued requests across 100 zones
    add("pct-delete_many-100", "zones100", "pyconntrack delete_many (100 zones)", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete_many",
                                 filters=[dict(zone=z) for z in t.zones]), zones=t.zones)],
        note="the queue coalesced: one walk")
    add("pct-flush-100", "zones100", "pyconntrack delete per request (flush)",
        "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete", filter=dict(zone=z), strategy="flush"),
                           zones=[z]) for z in t.zones],
        series=True, note="one kernel flush (one walk) per request")
    add("pct-index-100", "zones100", "pyconntrack delete per request (index)", "pyconntrack",
        lambda b, t: [Step(_call(b.pct, op="delete", filter=dict(zone=z), strategy="index"),
                           zones=[z]) for z in t.zones],
        series=True)
    add("conntrack-tools-100", "zones100", "conntrack -D -w Z per request", "peer",
        lambda b, t: [Step(_proc([*b.enter, "conntrack", "-D", "-w",
                                  str(z)]), zones=[z]) for z in t.zones],
        series=True, note="Neutron's single queue worker: one process per request")
    add("pyroute2-100", "zones100", "pyroute2 per request", "peer",
        lambda b, t: [Step(_call(b.peer, op="pyroute2", zones=[z]), zones=[z])
                      for z in t.zones],
        series=True)
    return M


# -------------------------------------------------------------------------- bench

class Bench:
    def __init__(self, opts: dict, methods: List[Method], progress: Optional[bool]) -> None:
        self.opts = opts
        self.methods = methods
        self.progress = progress
        self.rows: List[dict] = []
        self.fills: List[dict] = []
        self.rss: Dict[str, int] = {}
        self.extra: Dict[str, str] = {}
        self.ns = ""
        self.table: Optional[Table] = None
        self._pct: Optional[Worker] = None
        self._peer: Optional[Worker] = None
        self._next_zone = 0
        self.refilled: set = set()
        self.index_info: Dict[str, dict] = {}
        self.startup: Dict[str, dict] = {}     # the CLI start-up section, per size

    @property
    def enter(self) -> List[str]:
        """Run a command in the scratch netns: nsenter (net only) is the
        cheapest (ip netns exec also remounts /sys: ~2 ms more per process)."""
        if shutil.which("nsenter"):
            return ["nsenter", f"--net={scratch_netns.NETNS_DIR}/{self.ns}"]
        return ["ip", "netns", "exec", self.ns]

    def pct(self) -> Worker:
        if self._pct is None:
            self._pct = Worker("pct", self.ns)
        return self._pct

    def peer(self) -> Worker:
        if self._peer is None:
            self._peer = Worker("peer", self.ns)
        return self._peer

    def close_workers(self) -> None:
        for w in (self._pct, self._peer):
            if w is not None:
                w.close()
        self._pct = self._peer = None

    def _zones(self, n: int) -> List[int]:
        assert self.table is not None
        zs = self.table.std_zones
        out = [zs[(self._next_zone + i) % len(zs)] for i in range(n)]
        self._next_zone = (self._next_zone + n) % len(zs)
        return out

    def _fresh_zones(self, n: int, fixed: bool = False) -> List[int]:
        """Zones never refilled in this table: the eBPF index learns entries
        from packets and from its seeding walk, not from ctnetlink creates."""
        assert self.table is not None
        pool = self.table.fixed_zones if fixed else list(reversed(self.table.std_zones))
        fresh = [z for z in pool if z not in self.refilled]
        if len(fresh) < n:
            raise ConntrackError("no zone left that was never refilled (raise --zones)")
        return fresh[:n]

    def target_for(self, scenario: str, m: Optional[Method] = None) -> Target:
        if m is not None and m.id == "pct-delete_each-index":
            fresh = [r for r in range(REMOTES, 2 * REMOTES) if r not in self.used_remotes]
            if len(fresh) < TARGET_REMOTES:
                raise ConntrackError("no remote IPs left that were never refilled (fewer --reps)")
            return Target(remotes=fresh[:TARGET_REMOTES])
        if m is not None and "index" in m.id:
            return Target(zones=self._fresh_zones(1 if scenario == "zone" else MANY_ZONES,
                                                  fixed=m.id == "pct-index-fixed"))
        if scenario == "zone":
            return Target(zones=self._zones(1))
        if scenario == "remote50":
            return Target(remotes=list(range(TARGET_REMOTES)))
        return Target(zones=self._zones(MANY_ZONES))

    # -- one measurement: run the steps, verify, refill
    def measure(self, m: Method, ct: Conntrack) -> dict:
        assert self.table is not None
        target = self.target_for(m.scenario, m)
        steps = m.steps(self, target)
        if "index" in m.id and str(self.table.size) in self.index_info:
            # refills go through ctnetlink, which the index cannot see: it
            # would (rightly) fall back. Untimed: one walk, when needed.
            ct.index_resync()
        before = ct.table_count()
        budget = self.opts["budget"]
        seconds, walks, done = 0.0, 0, 0
        strategies: set = set()
        zones: List[int] = []
        remotes: List[int] = []
        for st in steps:
            s, w, strategy = st.run()
            if strategy:
                strategies.add(strategy)
            seconds += s
            walks += w
            done += 1
            zones += st.zones
            remotes += st.remotes
            if (m.series and budget and done >= MIN_SAMPLE and done < len(steps)
                    and seconds / done * len(steps) > budget
                    and done % m.group == 0):
                break
        after = ct.table_count()
        expected = self.table.entries(zones, remotes)
        deleted = before - after
        total = seconds * len(steps) / done
        self.refilled.update(zones)
        self.used_remotes.update(remotes)
        if deleted == expected:
            self.table.refill(ct, zones, remotes)
        else:  # put the table back exactly: empty the targets, then refill
            fs = [Filter(zone=z) for z in zones]
            fs += [Filter(zone=self.table.zone_of_remote(r), src=s, dst=d)
                   for r in remotes for s, d in _pairs([r])]
            if fs:
                ct.delete_many(fs)
            self.table.refill(ct, zones, remotes)
        return {"seconds": total, "measured_s": seconds, "walks": walks * len(steps) // done,
                "steps_run": done, "steps": len(steps), "deleted": deleted,
                "expected": expected, "strategies": sorted(strategies)}

    def run_size(self, size: int, first: bool) -> None:
        o = self.opts
        self.table = Table(size, o["zones"], fixed_zones=o["reps"] + 1)
        self._next_zone = 0
        self.refilled = set()
        self.used_remotes: set = set()
        for m in self.methods:  # failures are per table: try again on this one
            if m.skip.startswith(("failed", "not available")):
                m.skip = ""
        with scratch_netns.scratch("pct-bench") as ns, Conntrack(ns) as ct:
            self.ns = ns
            try:
                # start the workers now: their one-time costs (imports, the
                # capability probe's throwaway netns) stay out of the timings
                self.pct().call(op="warmup")
                self.peer().call(op="warmup")
                if first and not o.get("startup_only"):
                    self._bulk_create(ct)
                start = time.perf_counter()
                created = self.table.fill(ns, Progress(size, f"filling {_human(size):>5}",
                                                       enabled=self.progress))
                fill_s = time.perf_counter() - start
                self.fills.append({"size": size, "created": created, "seconds": fill_s,
                                   "per_s": created / fill_s, "zones": o["zones"],
                                   "table_count": ct.table_count()})
                self._log(f"size {_human(size)}: {created:,} entries in {o['zones']} zones "
                          f"filled in {fill_s:.2f} s ({created / fill_s:,.0f}/s)")
                if first and any(m.id.startswith("pyroute2") for m in self.methods):
                    try:
                        z = self._zones(1)[0]
                        self.extra["pyroute2_delete_entry"] = self.peer().call(
                            op="pitfall", zone=z)["result"]
                        n_left = ct.count(Filter(zone=z))
                        ct.delete(Filter(zone=z), strategy="walk")
                        self.table.refill(ct, [z])
                        self.extra["pyroute2_delete_entry"] += f" (zone {z} kept {n_left} entries)"
                    except ConntrackError as exc:
                        self.extra["pyroute2_delete_entry"] = f"not checked: {exc}"
                self._check_index(size)
                if o.get("startup", True):
                    StartupSection(self, ct).run(size)
                for scenario in SCENARIOS:
                    ms = [m for m in self.methods if m.scenario == scenario]
                    samples: Dict[str, List[dict]] = {m.id: [] for m in ms}
                    for rep in range(o["reps"]):
                        for m in ms:
                            if m.skip:
                                continue
                            try:
                                samples[m.id].append(self.measure(m, ct))
                            except ConntrackError as exc:
                                m.skip = f"failed: {exc}"
                                self._log(f"  {m.id}: {m.skip}")
                    for m in ms:
                        self._record(m, size, samples[m.id])
                self.rss[str(size)] = self.pct().call(op="rss")["maxrss_kb"]
                if ct.table_count() != size:
                    raise ConntrackError(f"table changed size: {ct.table_count()} != {size}")
            finally:
                if self._pct is not None and any("index" in m.id for m in self.methods):
                    try:  # the index pins live in bpffs: never leave them behind
                        self._pct.call(op="detach_index")
                    except ConntrackError as exc:
                        self._log(f"detaching the index failed: {exc}")
                self.close_workers()

    def _check_index(self, size: int) -> None:
        """Attach the eBPF zone index (when this pyconntrack has it) after the
        fill: its seeding walk records the table; skip the index methods with
        the reason otherwise."""
        ms = [m for m in self.methods if "index" in m.id]
        if not ms or all(m.skip for m in ms):
            return
        reason = ""
        try:
            if "index" not in self.pct().call(op="strategies")["strategies"]:
                reason = "not available: Conntrack has no index strategy yet"
            else:
                a = self.pct().call(op="attach_index", max_records=int(size * 1.2) + 10_000)
                if not a["attached"]:
                    reason = f"not available: {a['reason']}"
                else:
                    self.index_info[str(size)] = a
                    self._log(f"  eBPF index attached in {a['seconds']:.2f} s "
                              f"(seeded {a['seeded']}, lost {a['lost']})")
        except ConntrackError as exc:
            reason = f"not available: {exc}"
        for m in ms:
            if reason and not m.skip:
                m.skip = reason

    def _bulk_create(self, ct: Conntrack) -> None:
        n = self.opts["bulk"]
        start = time.perf_counter()
        created = ct.create_many(n, zone=BULK_ZONE, proto="udp", src="10.251.0.1")
        seconds = time.perf_counter() - start
        ct.delete(Filter(zone=BULK_ZONE), strategy="auto")
        self.extra["bulk_create"] = json.dumps({"entries": created, "seconds": seconds,
                                                "per_s": created / seconds})
        self._log(f"bulk create: {created:,} entries in one create_many call in "
                  f"{seconds:.2f} s ({created / seconds:,.0f}/s)")

    def _record(self, m: Method, size: int, samples: List[dict]) -> None:
        row = {"scenario": m.scenario, "method": m.id, "label": m.label, "kind": m.kind,
               "size": size, "note": m.note}
        if m.skip or not samples:
            row.update(skipped=m.skip or "no sample")
            self.rows.append(row)
            return
        secs = [s["seconds"] for s in samples]
        row.update(
            reps=len(samples), seconds=secs, median_s=statistics.median(secs),
            min_s=min(secs), max_s=max(secs),
            walks=max(s["walks"] for s in samples),
            deleted=[s["deleted"] for s in samples], expected=[s["expected"] for s in samples],
            exact=all(s["deleted"] == s["expected"] for s in samples),
            steps=samples[0]["steps"],
            strategies=sorted({x for s in samples for x in s["strategies"]}),
            steps_run=min(s["steps_run"] for s in samples),
            extrapolated=any(s["steps_run"] < s["steps"] for s in samples))
        self.rows.append(row)
        flag = "" if row["exact"] else "  (deleted != expected!)"
        ext = (f" (sampled {row['steps_run']}/{row['steps']}, extrapolated)"
               if row["extrapolated"] else "")
        self._log(f"  {m.scenario:<9} {m.id:<22} {row['median_s'] * 1000:10.1f} ms "
                  f"[{row['min_s'] * 1000:.1f}-{row['max_s'] * 1000:.1f}]{ext}{flag}")

    def _log(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        """Ratios to the floor measured on the same table."""
        floors = {r["size"]: r["median_s"] for r in self.rows
                  if r["method"] == "floor" and "median_s" in r}
        for r in self.rows:
            if "median_s" in r and floors.get(r["size"]):
                r["ratio_to_floor"] = r["median_s"] / floors[r["size"]]


# ------------------------------------------------------------ CLI start-up section

STARTUP_FIGURES = {
    # id: (label, baseline id or None)
    "raw_flush": ("kernel zone flush (raw netlink, in a warm process)", None),
    "cli_delete": ("`pyconntrack delete --zone Z` (auto: the index when attached)", "raw_flush"),
    "cli_delete_work": ("... of which the delete itself (its `elapsed_s`)", "raw_flush"),
    "cli_delete_flush": ("`pyconntrack delete --zone Z --strategy flush`", "raw_flush"),
    "cli_delete_nocache": ("`pyconntrack delete --zone Z`, probe cache off "
                           "(what every call paid before)", "raw_flush"),
    "raw_dump": ("kernel zone-filtered dump (raw netlink, in a warm process)", None),
    "cli_count": ("`pyconntrack count --zone Z`", "raw_dump"),
    "probe_cached": ("`pyconntrack probe`, cached verdict", None),
    "probe_cold": ("`pyconntrack probe`, cache off (the probe runs)", "probe_cached"),
    "python": ("`python -c pass` (the interpreter alone)", None),
}


def _cli_argv() -> List[str]:
    """The installed console script next to this interpreter, else -m."""
    script = os.path.join(os.path.dirname(sys.executable), "pyconntrack")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "pyconntrack"]


class StartupSection:
    """End-to-end latency of one CLI process (spawn to exit, as an agent or an
    operator runs it) against the kernel's floor measured on the same table
    in the same run: ``delete --zone Z`` vs the raw zone flush, ``count
    --zone Z`` vs the raw zone-filtered dump, and the capability probe cold
    vs cached. The CLI uses a probe cache in a private directory of this run
    (PYCONNTRACK_PROBE_CACHE=DIR), never the machine's /run/pyconntrack. Its
    environment drops PYTHONDONTWRITEBYTECODE so that, as in an installed
    package, modules are loaded from bytecode, not compiled at every start."""

    def __init__(self, bench: "Bench", ct: Conntrack) -> None:
        self.b = bench
        self.ct = ct
        self.argv = _cli_argv()

    def _cli(self, args: List[str], env: dict) -> tuple:
        start = time.perf_counter()
        p = subprocess.run([*self.argv, *args], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if p.returncode != 0:
            raise ConntrackError(f"pyconntrack {' '.join(args)}: exit {p.returncode}: "
                                 f"{p.stderr.strip()[-300:]}")
        return seconds, (json.loads(p.stdout) if "--json" in args else p.stdout)

    def _refill(self, z: int, deleted: int) -> bool:
        table = self.b.table
        assert table is not None
        expected = table.entries([z])
        if deleted != expected:  # put the zone back exactly
            self.ct.delete(Filter(zone=z))
        table.refill(self.ct, [z])
        self.b.refilled.add(z)  # the index never saw the refill
        return deleted == expected

    def _attach(self, size: int) -> tuple:
        """(attached by this section, reason it is not attached)."""
        if str(size) in self.b.index_info:
            return False, ""
        try:
            a = self.b.pct().call(op="attach_index", max_records=int(size * 1.2) + 10_000)
        except ConntrackError as exc:
            return False, str(exc)
        if not a.get("attached"):
            return False, a.get("reason", "not attached")
        self.b.index_info[str(size)] = a
        self.b._log(f"  eBPF index attached in {a['seconds']:.2f} s (startup section)")
        return True, ""

    def run(self, size: int) -> None:
        import tempfile
        b, ct = self.b, self.ct
        reps = b.opts["reps"]
        cache_dir = tempfile.mkdtemp(prefix="pct-bench-probe-cache-")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached = {**env, "PYCONNTRACK_PROBE_CACHE": cache_dir}
        cold = {**env, "PYCONNTRACK_PROBE_CACHE": "0"}
        ns = ["--netns", b.ns]
        times: Dict[str, List[float]] = {k: [] for k in STARTUP_FIGURES}
        info: dict = {"strategies": set(), "exact": True, "index": "", "counts": []}
        attached_here = False
        try:
            attached_here, why = self._attach(size)
            info["index"] = why or "attached"
            # warm-up: writes the run's probe cache and the bytecode
            _, first = self._cli(["probe", "--json"], cached)
            if first.get("source") != "probe" or not first.get("probed"):
                raise ConntrackError(f"probe cache warm-up: {first}")
            self._cli(["count", *ns, "--zone", "65001", "--json"], cached)
            for _ in range(reps):
                # each figure right after its baseline (the load of a shared
                # machine changes from second to second); the probe's own
                # flushes (cache off) last, they hold every ctnetlink user up
                for fid in ("raw_flush", "cli_delete", "cli_delete_flush",
                            "cli_delete_nocache"):
                    # the index holds only zones never refilled
                    fresh = fid in ("cli_delete", "cli_delete_nocache")
                    z = b._fresh_zones(1)[0] if fresh else b._zones(1)[0]
                    if fresh and info["index"] == "attached":
                        # the refills go through ctnetlink, which the index
                        # cannot see: it would (rightly) fall back. Untimed.
                        ct.index_resync()
                    before = ct.table_count()
                    if fid == "raw_flush":
                        s = b.peer().call(op="raw_flush", zones=[z])["seconds"]
                    else:
                        args = ["delete", *ns, "--zone", str(z), "--json"]
                        if fid == "cli_delete_flush":
                            args += ["--strategy", "flush"]
                        s, out = self._cli(args, cold if fid == "cli_delete_nocache" else cached)
                        if fid == "cli_delete":
                            info["strategies"].add(out["strategy"])
                            times["cli_delete_work"].append(out["elapsed_s"])
                    times[fid].append(s)
                    info["exact"] &= self._refill(z, before - ct.table_count())
                z = b._zones(1)[0]
                s_raw = b.peer().call(op="raw_dump", zone=z)
                s_cli, out = self._cli(["count", *ns, "--zone", str(z), "--json"], cached)
                times["raw_dump"].append(s_raw["seconds"])
                times["cli_count"].append(s_cli)
                expected = b.table.entries([z]) if b.table else -1
                info["counts"].append([s_raw["entries"], out["count"], expected])
                info["exact"] &= s_raw["entries"] == out["count"] == expected
                s, out = self._cli(["probe", "--json"], cold)
                times["probe_cold"].append(s)
                s, out = self._cli(["probe", "--json"], cached)
                if out.get("source") != "cache":
                    raise ConntrackError(f"the probe cache was not used: {out.get('cache')}")
                times["probe_cached"].append(s)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
                times["python"].append(time.perf_counter() - start)
        except ConntrackError as exc:
            b._log(f"  startup section failed: {exc}")
            info["error"] = str(exc)
        finally:
            if attached_here:
                try:
                    b.pct().call(op="detach_index")
                    del b.index_info[str(size)]
                except ConntrackError as exc:
                    b._log(f"detaching the index failed: {exc}")
            shutil.rmtree(cache_dir, ignore_errors=True)
        figures = {}
        for fid, secs in times.items():
            if secs:
                figures[fid] = {"median_s": statistics.median(secs), "min_s": min(secs),
                                "max_s": max(secs), "seconds": secs}
        for fid, (_, base) in STARTUP_FIGURES.items():
            if base and fid in figures and base in figures:
                figures[fid]["ratio"] = figures[fid]["median_s"] / figures[base]["median_s"]
                # least disturbed samples of each (every ctnetlink request on the host
                # waits for any flush in progress: the nfnetlink subsystem mutex)
                figures[fid]["ratio_min"] = figures[fid]["min_s"] / figures[base]["min_s"]
                # each repetition against its own baseline, measured just before
                figures[fid]["ratio_paired"] = statistics.median(
                    x / y for x, y in zip(times[fid], times[base]))
                figures[fid]["baseline"] = base
        row = {"reps": reps, "figures": figures, "cli": " ".join(self.argv),
               "delete_strategies": sorted(info["strategies"]), "exact": info["exact"],
               "index": info["index"], "counts": info["counts"],
               "table_count": ct.table_count()}
        if "error" in info:
            row["error"] = info["error"]
        b.startup[str(size)] = row
        for fid, f in figures.items():
            ratio = (f" x{f['ratio']:.2f} {f['baseline']} (min/min x{f['ratio_min']:.2f})"
                     if "ratio" in f else "")
            b._log(f"  startup   {fid:<20} {f['median_s'] * 1000:10.1f} ms "
                   f"[{f['min_s'] * 1000:.1f}-{f['max_s'] * 1000:.1f}]{ratio}")


def startup_targets(result: dict) -> List[dict]:
    st = result.get("startup") or {}
    if not st:
        return []
    big = max(st, key=int)
    figs = st[big]["figures"]
    out = []
    d = figs.get("cli_delete")
    if d and "ratio" in d:
        strategies = ",".join(st[big].get("delete_strategies", [])) or "?"
        out.append({"id": "S1", "target": "CLI `delete --zone Z` (index attached), end to end, "
                                          "<= 0.5x the raw kernel zone flush",
                    "measured": f"{d['ratio']:.2f}x at {_human(int(big))} (paired "
                                f"{d.get('ratio_paired', 0):.2f}x, min/min "
                                f"{d.get('ratio_min', 0):.2f}x; strategy {strategies})",
                    "verdict": ("met" if d["ratio"] <= 0.5 else "NOT met")
                    + ("" if "index" in strategies else " (index not used)")})
    c = figs.get("cli_count")
    if c and "ratio" in c:
        out.append({"id": "S2", "target": "CLI `count --zone Z`, end to end, "
                                          "<= 1.5x a raw zone-filtered dump",
                    "measured": f"{c['ratio']:.2f}x at {_human(int(big))} (paired "
                                f"{c.get('ratio_paired', 0):.2f}x, min/min "
                                f"{c.get('ratio_min', 0):.2f}x)",
                    "verdict": "met" if c["ratio"] <= 1.5 else "NOT met"})
    return out


def startup_markdown(result: dict) -> List[str]:
    st = result.get("startup") or {}
    if not st:
        return []
    sizes = sorted(st, key=int)
    lines = ["**CLI start-up: one process, spawn to exit** (median [min-max] ms; ratio of "
             "medians to the baseline measured in the same run; paired: median of each "
             "repetition's ratio to the baseline measured just before it; min/min: ratio of "
             "minima)", "",
             "| figure | " + " | ".join(_human(int(s)) for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for fid, (label, base) in STARTUP_FIGURES.items():
        cells = []
        for s in sizes:
            f = st[s]["figures"].get(fid)
            if not f:
                cells.append("")
                continue
            c = f"{_ms(f['median_s'])} [{_ms(f['min_s'])}-{_ms(f['max_s'])}]"
            if "ratio" in f:
                c += (f" ×{f['ratio']:.2f} {base} (paired ×{f.get('ratio_paired', 0):.2f}, "
                      f"min/min ×{f.get('ratio_min', 0):.2f})")
            cells.append(c)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in sizes:
        row = st[s]
        notes = [f"delete strategies {', '.join(row.get('delete_strategies', [])) or '-'}",
                 f"index: {row.get('index', '')}",
                 "exact" if row.get("exact") else "NOT exact (deleted/counted != expected)"]
        if row.get("error"):
            notes.append(f"error: {row['error']}")
        lines.append(f"- {_human(int(s))}: " + "; ".join(notes))
    lines.append("")
    return lines


# ------------------------------------------------------------------------ targets

def _row(rows, method: str, size: int) -> Optional[dict]:
    for r in rows:
        if r["method"] == method and r["size"] == size and "median_s" in r:
            return r
    return None


def evaluate_targets(result: dict) -> List[dict]:
    rows = result["results"]
    sizes = result["meta"]["sizes"]
    big = max(sizes)
    out = []

    def verdict(ok: Optional[bool]) -> str:
        return "not measured" if ok is None else ("met" if ok else "NOT met")

    # P1
    parts, oks = [], []
    for s in sizes:
        w, f, c = _row(rows, "pct-walk", s), _row(rows, "floor", s), _row(rows, "conntrack-tools", s)
        if w and f:
            r1 = w["median_s"] / f["median_s"]
            txt = f"{_human(s)}: walk {r1:.2f}x floor"
            ok = r1 <= 1.10
            if c:
                r2 = c["median_s"] / w["median_s"]
                txt += f", {r2:.1f}x faster than conntrack-tools"
                ok = ok and r2 >= 10
            parts.append(txt)
            if s == big:
                oks.append(ok)
    out.append({"id": "P1", "target": "walk-path zone cleanup <= 1.10x raw kernel zone flush "
                                      "and >= 10x faster than conntrack-tools",
                "measured": "; ".join(parts) or "-",
                "verdict": verdict(oks[0] if oks else None) + f" (at {_human(big)})"})
    # P2
    # the same zone size at every table size (the "flat in table size")
    i_big = _row(rows, "pct-index-fixed", big) or _row(rows, "pct-index", big)
    f_big = _row(rows, "floor", big)
    below = [s for s in sizes if s < big]
    i_prev = (_row(rows, "pct-index-fixed", max(below)) or _row(rows, "pct-index", max(below))
              ) if below else None
    if i_big and f_big:
        speed = f_big["median_s"] / i_big["median_s"]
        txt = f"{speed:.0f}x faster than the flush at {_human(big)}"
        ok = speed >= 100
        if i_prev:
            growth = i_big["median_s"] / i_prev["median_s"]
            txt += f"; t({_human(big)})/t({_human(max(below))}) = {growth:.2f}"
            ok = ok and growth <= 1.5
        v = verdict(ok)
    else:
        skip = next((r.get("skipped") for r in rows if r["method"] == "pct-index"), "")
        txt, v = skip or "-", "not measured"
    out.append({"id": "P2", "target": "index cleanup >= 100x faster than the raw flush at 1M, "
                                      "t(1M)/t(100k) <= 1.5", "measured": txt, "verdict": v})
    # P3
    n, d = _row(rows, "neutron", big), _row(rows, "pct-delete_many", big)
    if n and d:
        speed = n["median_s"] / d["median_s"]
        ext = " (Neutron's total extrapolated from a sample)" if n.get("extrapolated") else ""
        out.append({"id": "P3", "target": "zone + 50 remote IPs >= 20x faster than Neutron's way",
                    "measured": f"{speed:.0f}x at {_human(big)}{ext}",
                    "verdict": verdict(speed >= 20)})
    else:
        out.append({"id": "P3", "target": "zone + 50 remote IPs >= 20x faster than Neutron's way",
                    "measured": "-", "verdict": "not measured"})
    # P4
    walks = [(s, _row(rows, "pct-delete_many-100", s)) for s in sizes]
    walks = [(s, r["walks"]) for s, r in walks if r]
    out.append({"id": "P4", "target": "100 queued requests -> <= 2 walks",
                "measured": ", ".join(f"{_human(s)}: {w} walk(s)" for s, w in walks) or "-",
                "verdict": verdict(all(w <= 2 for _, w in walks) if walks else None)})
    # P5
    rss = result["peak_rss_kb"].get(str(big))
    out.append({"id": "P5", "target": "peak RSS <= 100 MB at 1M",
                "measured": f"{rss / 1024:.0f} MB at {_human(big)}" if rss else "-",
                "verdict": verdict(rss / 1024 <= 100 if rss else None)})
    # P6
    bulk = result.get("bulk_create")
    fills = ", ".join(f"{_human(f['size'])} table {f['per_s'] / 1000:.0f}k/s"
                      for f in result["fills"])
    if bulk:
        out.append({"id": "P6", "target": "bulk create >= 300k entries/s",
                    "measured": f"one create_many of {bulk['entries']:,}: "
                                f"{bulk['per_s'] / 1000:.0f}k/s; table fills "
                                f"(per zone and protocol): {fills}",
                    "verdict": verdict(bulk["per_s"] >= 300_000)})
    else:
        out.append({"id": "P6", "target": "bulk create >= 300k entries/s", "measured": fills,
                    "verdict": "not measured"})
    out += startup_targets(result)
    if big < 1_000_000:
        for t in out:
            if t["id"] in ("P2", "P5", "S1", "S2") and t["verdict"] != "not measured":
                t["verdict"] += f" (target is at 1M; largest size here {_human(big)})"
    return out


# ------------------------------------------------------------------------- output

def _ms(s: float) -> str:
    ms = s * 1000
    return f"{ms:,.0f}" if ms >= 100 else (f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}")


def markdown(result: dict) -> str:
    meta = result["meta"]
    sizes = meta["sizes"]
    lines = [f"### pyconntrack bench: kernel {meta['kernel']}, {meta['cpus']} cores, "
             f"{meta['zones']} zones, {meta['reps']} repetitions, "
             f"{meta['buckets']} hash buckets",
             "",
             "Median ms [min-max] and ratio to the raw kernel zone flush (the floor) measured "
             "on the same table; `~` = sampled series, total extrapolated.",
             ""]
    for scenario, title in SCENARIOS.items():
        rows = [r for r in result["results"] if r["scenario"] == scenario]
        if not rows:
            continue
        lines += [f"**{title}**", "",
                  "| method | " + " | ".join(_human(s) for s in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        seen = []
        for r in rows:
            if r["method"] not in seen:
                seen.append(r["method"])
        for mid in seen:
            cells, label = [], mid
            for s in sizes:
                r = next((x for x in rows if x["method"] == mid and x["size"] == s), None)
                if r is None:
                    cells.append("")
                    continue
                label = r["label"]
                if "median_s" not in r:
                    cells.append(f"skipped: {r.get('skipped', '')}")
                    continue
                c = (f"{'~' if r.get('extrapolated') else ''}{_ms(r['median_s'])} "
                     f"[{_ms(r['min_s'])}-{_ms(r['max_s'])}]")
                if "ratio_to_floor" in r:
                    c += f" ×{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] < 10 \
                        else f" ×{r['ratio_to_floor']:.0f}"
                if not r.get("exact", True):
                    c += " (deleted != expected)"
                cells.append(c)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += startup_markdown(result)
    ixf = result.get("index_figures")
    if ixf:
        from . import index_bench
        lines += ["**eBPF index: churn, setup cost, attach** (`pyconntrack bench --index` "
                  "runs only these)", ""]
        lines += [f"skipped: {ixf['skipped']}", ""] if "skipped" in ixf \
            else [index_bench.markdown(ixf)]
    lines += ["**targets**", "", "| | target | measured | verdict |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['id']} | {t['target']} | {t['measured']} | {t['verdict']} |")
    lines.append("")
    rss = ", ".join(f"{_human(int(s))}: {kb / 1024:.0f} MB"
                    for s, kb in result["peak_rss_kb"].items())
    lines.append(f"Peak RSS of the pyconntrack worker process: {rss}.")
    if "pyroute2_delete_entry" in result:
        lines.append(f"pyroute2 `Conntrack.delete(entry)` on a zone entry: "
                     f"{result['pyroute2_delete_entry']}.")
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (NullFormatter)

    meta = result["meta"]
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(6.2 * len(SCENARIOS), 5.4), dpi=110)
    floor = sorted(((r["size"], r["median_s"]) for r in result["results"]
                    if r["method"] == "floor" and "median_s" in r))
    styles = {"floor": "--", "pyconntrack": "-", "peer": ":"}
    palette = plt.get_cmap("tab10").colors
    colors: Dict[str, tuple] = {}
    family = {"pct-flush": 0, "pct-flush-100": 0, "pct-walk": 1, "pct-delete_many": 1,
              "pct-delete_many-100": 1, "pct-delete_each": 4, "pct-index": 2,
              "pct-index-fixed": 8, "pct-delete_each-index": 2,
              "pct-index-100": 2, "conntrack-tools": 3, "conntrack-tools-100": 3,
              "neutron": 3, "pyroute2": 5, "pyroute2-remote": 5, "pyroute2-100": 5}
    sizes = meta["sizes"]
    for ax, (scenario, title) in zip(axes, SCENARIOS.items()):
        rows = [r for r in result["results"] if r["scenario"] == scenario and "median_s" in r]
        by: Dict[str, List[dict]] = {}
        for r in rows:
            by.setdefault(r["method"], []).append(r)
        if scenario != "zone" and floor:
            ax.plot([s for s, _ in floor], [v for _, v in floor], color="black",
                    linestyle="--", marker="o", label="kernel zone flush (floor, 1 zone)")
        for mid, rs in by.items():
            rs.sort(key=lambda r: r["size"])
            ls = styles.get(rs[0]["kind"], "-")
            color = "black" if mid == "floor" else colors.setdefault(
                mid, palette[family.get(mid, 6 + len(colors) % 4)])
            xs = [r["size"] for r in rs]
            ys = [r["median_s"] for r in rs]
            err = [[y - r["min_s"] for y, r in zip(ys, rs)],
                   [r["max_s"] - y for y, r in zip(ys, rs)]]
            label = rs[0]["label"] + (" (~ sampled)" if any(r.get("extrapolated")
                                                             for r in rs) else "")
            ax.errorbar(xs, ys, yerr=err, marker="o", linestyle=ls, color=color,
                        capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([_human(x) for x in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("entries in the table")
        ax.set_ylabel("seconds (median, min-max)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.suptitle(f"pyconntrack bench: kernel {meta['kernel']}, {meta['cpus']} cores, "
                 f"{meta['zones']} zones, median of {meta['reps']} (bars: min-max), "
                 f"{meta['date']}; lower is better", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- run

def _meta(opts: dict, limits: KernelLimits) -> dict:
    from .. import __version__ as version  # type: ignore[attr-defined]
    try:
        import pyroute2
        p2 = getattr(pyroute2, "__version__", "?")
    except ImportError:
        p2 = None
    ctv = None
    if shutil.which("conntrack"):
        p = subprocess.run(["conntrack", "--version"], capture_output=True, text=True)
        ctv = (p.stdout or p.stderr).strip()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    from ..conntrack import probe_capabilities
    caps = probe_capabilities()
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "mem_gb": round(mem_kb / 1024 / 1024, 1), "python": platform.python_version(),
            "pyconntrack": version, "pyroute2": p2, "conntrack_tools": ctv,
            "sizes": opts["sizes"], "zones": opts["zones"], "reps": opts["reps"],
            "budget_s": opts["budget"], "buckets": _read(SYSCTL_BUCKETS),
            "nf_conntrack_max_during_run": _read(SYSCTL_MAX),
            "restored_after_run": limits.restored(),
            "probe": {k: getattr(caps, k) for k in ("flush_zone", "dump_zone", "zones")},
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "quick": opts["quick"]}


def options(args) -> dict:
    q = bool(getattr(args, "quick", False))
    sizes = ([_size(s) for s in args.sizes.split(",") if s.strip()] if args.sizes
             else (QUICK["sizes"] if q else DEFAULT_SIZES))
    zones = args.zones or (QUICK["zones"] if q else 4096)
    reps = args.reps or (QUICK["reps"] if q else 3)
    budget = args.budget if args.budget is not None else (QUICK["budget"] if q else 30.0)
    if args.full_peers:
        budget = 0.0
    if not 128 <= zones <= 65000:
        raise InvalidFilter("--zones must be between 128 and 65000")
    if not 1 <= reps <= 50:
        raise InvalidFilter("--reps must be between 1 and 50")
    if min(sizes) < zones * 2:
        raise InvalidFilter(f"every table size must be at least 2 x --zones ({2 * zones})")
    startup_only = bool(getattr(args, "startup_only", False))
    if startup_only and getattr(args, "no_startup", False):
        raise InvalidFilter("--startup-only and --no-startup exclude each other")
    return {"sizes": sorted(set(sizes)), "zones": zones, "reps": reps, "budget": budget,
            "quick": q, "bulk": QUICK["bulk"] if q else 200_000,
            "startup": not getattr(args, "no_startup", False), "startup_only": startup_only}


def plot_unavailable() -> Optional[str]:
    """Why the PNG cannot be drawn here (None: it can)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"matplotlib is needed for the plot: {EXTRA_HINT}"
    return None


def _write_files(out: str, stem: str, result: dict, md: str) -> None:
    """DIR/STEM.json and DIR/STEM.md."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)


def _render(result: dict, args) -> None:
    md = markdown(result)
    if args.out:
        _write_files(args.out, "results", result, md)
        if not args.no_plot:
            missing = plot_unavailable()
            if missing:
                sys.stderr.write(f"pyconntrack bench: plot skipped ({missing}); "
                                 f"table and JSON written to {args.out}\n")
            else:
                plot(result, os.path.join(args.out, "results.png"))
    print(json.dumps(result, indent=1) if args.json else md)


def _run_index_figures(args) -> int:
    from . import index_bench
    result = index_bench.run_all(quick=bool(getattr(args, "quick", False)))
    md = index_bench.markdown(result)
    if args.out:
        _write_files(args.out, "index", result, md)
    print(json.dumps(result, indent=1) if args.json else md)
    return 0


def run(args) -> int:
    if getattr(args, "index", False):
        return _run_index_figures(args)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        result["targets"] = evaluate_targets(result)
        _render(result, args)
        return 0
    methods = build_methods()
    if args.list:
        for m in methods:
            print(f"{m.id:<22} {m.scenario:<9} {m.label}")
        return 0
    opts = options(args)
    if args.methods:
        wanted = {w.strip() for w in args.methods.split(",") if w.strip()}
        unknown = wanted - {m.id for m in methods}
        if unknown:
            raise InvalidFilter(f"unknown method(s) {', '.join(sorted(unknown))} (see --list)")
        methods = [m for m in methods if m.id in wanted or m.id == "floor"]
    if opts["startup_only"]:
        methods = []
    if not shutil.which("conntrack"):
        for m in methods:
            if m.id.startswith(("conntrack-tools", "neutron")):
                m.skip = "conntrack-tools not installed"
    pyroute2_skip = pyroute2_unusable()
    if pyroute2_skip:
        for m in methods:
            if m.id.startswith("pyroute2"):
                m.skip = pyroute2_skip
    if args.out and not args.no_plot and plot_unavailable():
        # said before a run of minutes, and again when the files are written
        sys.stderr.write(f"pyconntrack bench: the plot will be skipped ({plot_unavailable()})\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    progress = True if args.progress else None
    needed = int(max(max(opts["sizes"]), opts["bulk"] + min(opts["sizes"])) * 1.05) + 1000
    started = time.perf_counter()
    bench = Bench(opts, methods, progress)
    with KernelLimits(needed, args.buckets) as limits:
        meta = _meta(opts, limits)
        for i, size in enumerate(opts["sizes"]):
            bench.run_size(size, first=(i == 0))
    meta["restored_after_run"] = {k: _read(SYSCTL_MAX if k == "nf_conntrack_max" else HASHSIZE)
                                  for k in limits.restored()}
    index_figures = None
    if not opts["quick"] and not opts["startup_only"] and not args.methods \
            and not getattr(args, "no_index", False):
        from . import index_bench   # churn share, setup cost, attach at 1M
        bench._log("eBPF index figures (churn, setup rate, attach at 1M)")
        try:
            index_figures = index_bench.run_all()
        except ConntrackError as exc:   # e.g. no netfilter BPF: said, not fatal
            index_figures = {"skipped": str(exc)}
    meta["duration_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    bench.finish()
    result = {"meta": meta, "results": bench.rows, "fills": bench.fills,
              "peak_rss_kb": bench.rss}
    if "bulk_create" in bench.extra:
        result["bulk_create"] = json.loads(bench.extra["bulk_create"])
    if bench.index_info:
        result["index_attach"] = bench.index_info
    if "pyroute2_delete_entry" in bench.extra:
        result["pyroute2_delete_entry"] = bench.extra["pyroute2_delete_entry"]
    if bench.startup:
        result["startup"] = bench.startup
    if index_figures is not None:
        result["index_figures"] = index_figures
    result["targets"] = evaluate_targets(result)
    _render(result, args)
    sys.stderr.write(f"bench done in {meta['duration_s']} s\n")
    return 0
