"""Conntrack: the public entry point. filter -> plan -> walk or flush -> result."""
from __future__ import annotations

import dataclasses
import errno as _errno
import fcntl
import ipaddress
import os
import re
import threading
import time
from typing import Iterable, Iterator, Optional, Sequence

from . import _lowlevel as ll
from . import index as index_mod
from . import probe_cache
from .errors import (ConntrackError, InvalidFilter, KernelUnsupported, NamespaceNotFound,
                     PermissionDenied)
from .filter import Filter, _family, _proto, _zone, _zone_dir
from .plan import (IndexState, Plan, kernel_filters as _kflags, plan_delete,
                   plan_delete_many)
from .types import Capabilities, DeleteResult, Entry

NETNS_DIR = "/var/run/netns"
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

_probe_lock = threading.Lock()
_probe_cache: dict = {}


def _probe_kernel() -> Capabilities:
    """Run the probe (a throwaway netns: its walks pay for the whole shared table)."""
    caps = ll.probe()
    nf_bpf, zoned, reason = index_mod.availability()
    return Capabilities(**{**caps.to_dict(), "kernel": os.uname().release,
                           "netfilter_bpf": nf_bpf, "zoned_kfuncs": zoned,
                           "index_error": reason})


def probe_capabilities(refresh: bool = False) -> Capabilities:
    """What the kernel can do: probed once per process, or read from the
    per-boot cache a root process left (pyconntrack.probe_cache: checked for
    ownership, mode, symlinks and a key of boot id, kernel and pyconntrack
    build). ``refresh`` probes again and rewrites the cache."""
    with _probe_lock:
        key = os.getpid()  # a forked child probes for itself
        if refresh or key not in _probe_cache:
            caps = probe_cache.capabilities(_probe_kernel, index_mod.availability, refresh)
            _probe_cache.clear()
            _probe_cache[key] = caps
        caps = _probe_cache[key]
    return _apply_disabled(caps, os.environ.get(DISABLE_ENV, ""))


DISABLE_ENV = "PYCONNTRACK_DISABLE"


def _apply_disabled(caps: Capabilities, spec: str) -> Capabilities:
    """PYCONNTRACK_DISABLE=dump_zone,flush_zone,... turns proven features off
    (an operator distrusting a kernel, or tests forcing the fallback paths)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        return caps
    known = {k for k, v in caps.to_dict().items() if isinstance(v, bool) and k != "probed"}
    unknown = sorted(set(names) - known)
    if unknown:
        raise InvalidFilter(f"{DISABLE_ENV}: unknown capability {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
    return dataclasses.replace(caps, **{n: False for n in names})


UNSURE_REASON = ("{n} records the index cannot delete safely (a reply-direction zone, "
                 "or a tuple now used by another entry): walked")


def _add_counts(a: dict, b: dict) -> dict:
    out = dict(a)
    for k in ("matched", "deleted", "already_gone", "failed"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    out["errno"] = a.get("errno") or b.get("errno", 0)
    return out


def _not_attached_reason() -> str:
    try:
        index_mod.pin_root()
    except index_mod.PinRootRefused as exc:
        return f"not attached ({exc})"
    return "not attached"


def resolve_netns(netns: Optional[str]) -> Optional[str]:
    """A name under /var/run/netns, or an absolute path (e.g. /proc/PID/ns/net)."""
    if netns is None:
        return None
    if not isinstance(netns, str) or not netns:
        raise InvalidFilter(f"netns must be a name or an absolute path, not {netns!r}")
    if netns.startswith("/"):
        path = netns
    elif _NETNS_NAME.match(netns) and netns not in (".", ".."):
        path = os.path.join(NETNS_DIR, netns)
    else:
        raise InvalidFilter(f"invalid netns name {netns!r}")
    if not os.path.exists(path):
        raise NamespaceNotFound(f"network namespace not found: {netns} ({path})", 2, "open")
    return path


def _as_filter(f: Optional[Filter]) -> Filter:
    if f is None:
        return Filter()
    if not isinstance(f, Filter):
        raise InvalidFilter(f"expected a pyconntrack.Filter, not {type(f).__name__}")
    return f


NS_GET_NSTYPE = 0xB703        # ioctl: the namespace type of an nsfs fd (Linux 4.11+)
CLONE_NEWNET = 0x40000000
MAX_RESIZE_REWALKS = 3


def _open_netns(path: str, netns: str) -> int:
    """An fd on the namespace, so the Conntrack stays bound to the namespace it
    opened even if the name is removed (ip netns del) or reused meanwhile.
    O_NONBLOCK: a FIFO given as a path must not hang the caller."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise NamespaceNotFound(f"network namespace not found: {netns} ({path})", 2,
                                "open") from None
    except PermissionError as exc:
        raise PermissionDenied(f"permission denied opening network namespace {netns}: "
                               f"{exc.strerror}", exc.errno, "open") from None
    except OSError as exc:
        raise InvalidFilter(f"{netns!r} is not a network namespace: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise InvalidFilter(f"{netns!r} is not a network namespace")
    return fd


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise InvalidFilter(f"{name} must be True or False, not {value!r}")


def _check_entry(e) -> None:
    """delete_entries sends these fields to the kernel: they must be what
    dump() returns, never something a cffi conversion would choke on."""
    def uint(name, value, hi, optional=False):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            raise InvalidFilter(f"entry {name} must be an int 0..{hi}, not {value!r}")

    if not isinstance(e, Entry):
        raise InvalidFilter(f"delete_entries takes Entry objects, not {type(e).__name__}")
    if e.family not in ("ipv4", "ipv6"):
        raise InvalidFilter(f"entry family must be 'ipv4' or 'ipv6', not {e.family!r}")
    version = 4 if e.family == "ipv4" else 6
    for name in ("src", "dst", "reply_src", "reply_dst"):
        value = getattr(e, name)
        if not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
                or value.version != version:
            raise InvalidFilter(f"entry {name} must be an IPv{version} address, not {value!r}")
    uint("proto", e.proto, 255)
    uint("zone", e.zone, 0xFFFF)
    if e.zone_dir not in ("both", "orig", "reply"):
        raise InvalidFilter(f"entry zone_dir must be 'both', 'orig' or 'reply', "
                            f"not {e.zone_dir!r}")
    uint("id", e.id, 0xFFFFFFFF)
    for name in ("sport", "dport", "reply_sport", "reply_dport", "icmp_id"):
        uint(name, getattr(e, name), 0xFFFF, optional=True)
    for name in ("icmp_type", "icmp_code"):
        uint(name, getattr(e, name), 0xFF, optional=True)
    if (e.sport is None) != (e.dport is None):
        raise InvalidFilter("entry sport and dport are both set or both None")
    if e.icmp_type is not None and (e.icmp_code is None or e.icmp_id is None):
        raise InvalidFilter("entry icmp_type, icmp_code and icmp_id go together")


def _merge_walks(a: dict, b: dict, dry_run: bool) -> dict:
    """Results of a walk repeated after a table resize: a dry run counts the
    last walk only; a real one adds up (entries the first walk saw twice come
    back as already gone)."""
    if dry_run:
        return {**b, "walks": a["walks"] + b["walks"]}
    out = dict(b)
    for k in ("matched", "deleted", "already_gone", "failed", "walks", "dumped"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    out["errno"] = a["errno"] or b["errno"]
    if "per_filter" in a:
        out["per_filter"] = [_merge_walks(pa, pb, False)
                             for pa, pb in zip(a["per_filter"], b["per_filter"])]
    return out


def _buckets() -> int:
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_buckets") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65536


def _check_default_zone(f: Filter, allow: bool) -> None:
    if f.is_broad_on_default_zone() and not allow:
        what = "zone 0" if f.zone == 0 else "every zone, zone 0 included"
        raise InvalidFilter(
            f"filter {f.describe()} cannot exclude any entry of {what} (the host's own "
            "connections) beyond a family or protocol; pass allow_default_zone=True "
            "(CLI: --force) if that is really meant")


class Conntrack:
    """The conntrack table of one network namespace.

    ``Conntrack(netns=None)`` works on the caller's namespace; ``netns`` is a
    name under /var/run/netns or an absolute namespace path. ``capabilities``
    may lower (never raise) what the probe found, e.g. to force the fallback
    paths. Not shared between threads without the internal lock: every method
    takes it.
    """

    def __init__(self, netns: Optional[str] = None, *,
                 capabilities: Optional[Capabilities] = None) -> None:
        self.netns = netns
        path = resolve_netns(netns)
        self._nsfd = -1
        self._path: Optional[str] = None
        if path is not None:
            self._nsfd = _open_netns(path, netns)
            self._path = f"/proc/self/fd/{self._nsfd}"
        self._restrict = capabilities
        self._lock = threading.RLock()
        self._zone_index: Optional[index_mod.ZoneIndex] = None
        try:
            self._handle: Optional[ll.Handle] = ll.Handle(self._path, netns)
        except BaseException:
            self._close_nsfd()
            raise

    def _close_nsfd(self) -> None:
        if self._nsfd >= 0:
            os.close(self._nsfd)
            self._nsfd = -1

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._zone_index is not None:
                self._zone_index.close()
                self._zone_index = None
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            self._close_nsfd()

    def __del__(self) -> None:
        try:
            self._close_nsfd()
        except Exception:
            pass

    def __enter__(self) -> "Conntrack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _h(self) -> ll.Handle:
        if self._handle is None:
            raise ConntrackError("Conntrack is closed")
        return self._handle

    # -- capabilities --------------------------------------------------------
    def capabilities(self) -> Capabilities:
        caps = probe_capabilities()
        if self._restrict is not None:
            caps = caps.restrict(self._restrict)
        return caps

    # -- reading -----------------------------------------------------------------
    def dump(self, filter: Optional[Filter] = None) -> Iterator[Entry]:
        """Stream the matching entries (a private socket: safe to interleave
        with other calls)."""
        f = _as_filter(filter)
        kflags = _kflags(self.capabilities())
        with self._lock:
            self._h()   # closed: fail here, not on a recycled fd number
            handle = ll.Handle(self._path, self.netns)
        try:
            yield from ll.dump(handle, f, kflags)
        finally:
            handle.close()

    def count(self, filter: Optional[Filter] = None) -> int:
        f = _as_filter(filter)
        kflags = _kflags(self.capabilities())
        with self._lock:
            return ll.count(self._h(), f, kflags)

    def table_count(self) -> int:
        """Entries in the namespace's table (one stats message, no walk)."""
        with self._lock:
            return ll.table_count(self._h())

    # -- deleting ----------------------------------------------------------------
    def delete(self, filter: Filter, strategy: str = "auto", dry_run: bool = False,
               allow_default_zone: bool = False) -> DeleteResult:
        """Delete the entries matching ``filter``.

        ``strategy``: ``auto`` (fastest safe), ``flush`` (one kernel message;
        only zone [+ family, mark] on a kernel whose probe passed) or ``walk``
        (dump + exact match + batched per-entry deletes with zone and id).
        Raises InvalidFilter, KernelUnsupported (forced flush the kernel lacks),
        PermissionDenied, NamespaceNotFound, ConntrackError.
        """
        if filter is None:
            raise InvalidFilter("delete needs a Filter (Filter() deletes everything)")
        _check_bool("dry_run", dry_run)
        _check_bool("allow_default_zone", allow_default_zone)
        f = _as_filter(filter)
        _check_default_zone(f, allow_default_zone)
        state = self._index_state(f) if not dry_run else IndexState()
        plan = plan_delete(f, self.capabilities(), strategy, state)
        result = self._execute(plan, [f], dry_run)
        # auto fell back because the index could not vouch: resynchronise it
        # (one walk) so the next delete can use it. A strategy the caller
        # forced says nothing about the index: no walk is added behind it.
        if strategy == "auto" and state.attached and (state.dirty or state.blind) \
                and plan.strategy != "index" and not dry_run:
            self._resync(f.zone, plan, state)
        return result

    def delete_many(self, filters: Iterable[Filter], dry_run: bool = False,
                    allow_default_zone: bool = False, strategy: str = "auto") -> DeleteResult:
        """Delete entries matching any of ``filters`` in one walk, or with the
        eBPF zone index when attached and cheaper (``strategy``: auto, walk,
        index)."""
        fs, plan = self._plan_many("delete_many", filters, dry_run, allow_default_zone,
                                   strategy)
        if plan.strategy == "index":
            results = self._index_each(plan, fs)
            first = results[0]
            return DeleteResult(sum(r.matched for r in results), sum(r.deleted for r in results),
                                sum(r.already_gone for r in results),
                                sum(r.failed for r in results),
                                next((r.errno for r in results if r.errno), 0), first.strategy,
                                first.walks, first.elapsed_s, first.reason)
        return self._execute(plan, fs, dry_run)

    def _plan_many(self, what: str, filters: Iterable[Filter], dry_run: bool,
                   allow_default_zone: bool, strategy: str = "auto") -> tuple:
        _check_bool("dry_run", dry_run)
        _check_bool("allow_default_zone", allow_default_zone)
        if strategy not in ("auto", "walk", "index"):
            raise InvalidFilter(f"{what} strategy must be auto, walk or index, not {strategy!r}")
        fs = [_as_filter(f) for f in filters]
        if not fs:
            raise InvalidFilter(f"{what} needs at least one Filter")
        for f in fs:
            _check_default_zone(f, allow_default_zone)
        states = [] if dry_run or strategy == "walk" else self._index_states(fs)
        plan = plan_delete_many(fs, self.capabilities(), states)
        if strategy == "index" and plan.strategy != "index":
            raise KernelUnsupported(f"strategy index refused: {plan.reason}")
        return fs, plan

    def _index_states(self, fs: Sequence[Filter]) -> list:
        """The index's view of each filter (empty when no index is attached)."""
        with self._lock:
            if self._index() is None:
                return []
            by_zone: dict = {}
            for f in fs:
                key = (f.zone, index_mod.index_refusal(f))
                if key not in by_zone:
                    by_zone[key] = self._index_state(f)
            return [by_zone[(f.zone, index_mod.index_refusal(f))] for f in fs]

    def _index_each(self, plan: Plan, fs: Sequence[Filter]) -> list:
        start = time.perf_counter()
        strategy, walks, reason = "index", 0, plan.reason
        with self._lock:
            ix = self._index()
            if ix is None:
                raise KernelUnsupported("the eBPF zone index was detached meanwhile")
            per, unsure = ix.delete_each(self._h(), fs, plan.use_zone_attr)
            if unsure:  # records the index could not delete safely: walk for them
                r = self._walk(self._h(), fs, plan.kflags, False, plan.use_zone_attr)
                per = [_add_counts(p, q) for p, q in zip(per, r["per_filter"])]
                strategy, walks = "walk", r["walks"]
                reason = f"{reason}; {UNSURE_REASON.format(n=unsure)}"
        elapsed = time.perf_counter() - start
        return [DeleteResult(p["matched"], p["deleted"], p["already_gone"], p["failed"],
                             p["errno"], strategy, walks, elapsed, reason) for p in per]

    def delete_each(self, filters: Sequence[Filter], dry_run: bool = False,
                    allow_default_zone: bool = False, strategy: str = "auto") -> list:
        """Like delete_many (one walk), but one DeleteResult per filter: an
        entry matching several filters counts for the first of them. Each
        result carries the shared walk's walks and elapsed_s."""
        fs, plan = self._plan_many("delete_each", filters, dry_run, allow_default_zone,
                                   strategy)
        if plan.strategy == "index":
            return self._index_each(plan, fs)
        start = time.perf_counter()
        with self._lock:
            r = self._walk(self._h(), fs, plan.kflags, dry_run, plan.use_zone_attr)
        elapsed = time.perf_counter() - start
        return [DeleteResult(p["matched"], p["deleted"], p["already_gone"], p["failed"],
                             p["errno"], plan.strategy, r["walks"], elapsed, plan.reason)
                for p in r["per_filter"]]

    def delete_entries(self, entries: Iterable[Entry]) -> DeleteResult:
        """Delete exactly these entries (from dump()): by tuple, zone and id,
        so a newer connection reusing a tuple is never hit. No walk."""
        if isinstance(entries, (str, bytes, Entry)) or not hasattr(entries, "__iter__"):
            raise InvalidFilter("delete_entries takes an iterable of Entry objects")
        es = list(entries)
        for e in es:
            _check_entry(e)
        caps = self.capabilities()
        start = time.perf_counter()
        with self._lock:
            r = ll.delete_entries(self._h(), es, caps.send_zone)
        return DeleteResult(r["matched"], r["deleted"], r["already_gone"], r["failed"],
                            r["errno"], "entries", 0, time.perf_counter() - start, "given entries")

    def _create_parallel(self, spec: dict, count: int) -> tuple:
        """Kernel inserts dominate: large batches are split over the cores,
        one socket each (the shim releases the GIL)."""
        workers = min(os.cpu_count() or 1, 4) if count >= 20_000 else 1
        if workers == 1:
            with self._lock:
                return ll.create(self._h(), count=count, **spec)
        shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
        starts = [sum(shares[:i]) for i in range(workers)]
        results: list = [None] * workers

        def work(i: int) -> None:
            h = ll.Handle(self._path, self.netns)
            try:
                results[i] = ll.create(h, count=shares[i], first=starts[i], **spec)
            except ConntrackError as exc:
                results[i] = exc
            finally:
                h.close()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, ConntrackError):
                raise r
        first_errno = next((r[2] for r in results if r[2]), 0)
        return sum(r[0] for r in results), sum(r[1] for r in results), first_errno

    def _execute(self, plan: Plan, filters: Sequence[Filter], dry_run: bool) -> DeleteResult:
        start = time.perf_counter()
        with self._lock:
            h = self._h()
            if plan.strategy == "index" and not dry_run:
                ix = self._index()
                if ix is None:
                    raise KernelUnsupported("the eBPF zone index was detached meanwhile")
                r = ix.delete(h, filters[0], plan.use_zone_attr)
                strategy, walks, reason = "index", 0, plan.reason
                if r["unsure"]:  # records the index could not delete safely: walk
                    w = self._walk(h, filters, plan.kflags, False, plan.use_zone_attr)
                    r = _add_counts(r, w)
                    strategy, walks = "walk", w["walks"]
                    reason = f"{reason}; {UNSURE_REASON.format(n=r['unsure'])}"
                return DeleteResult(r["matched"], r["deleted"], r["already_gone"], r["failed"],
                                    r["errno"], strategy, walks, time.perf_counter() - start,
                                    reason)
            if plan.strategy == "flush" and not dry_run:
                before = ll.table_count(h)
                flushes = 0
                for _ in range(1 + MAX_RESIZE_REWALKS):  # a resize may hide entries
                    buckets = _buckets()
                    ll.flush(h, filters[0])
                    flushes += 1
                    if _buckets() == buckets:
                        break
                after = ll.table_count(h)
                gone = max(0, before - after)
                return DeleteResult(gone, gone, 0, 0, 0, "flush", flushes,
                                    time.perf_counter() - start, plan.reason)
            r = self._walk(h, filters, plan.kflags, dry_run, plan.use_zone_attr)
        reason = plan.reason
        if r.get("resized"):
            reason += f"; the table was resized during the walk: walked {r['walks']} times"
        return DeleteResult(r["matched"], r["deleted"], r["already_gone"], r["failed"],
                            r["errno"], plan.strategy, r["walks"],
                            time.perf_counter() - start, reason)

    @staticmethod
    def _walk(h: ll.Handle, filters: Sequence[Filter], kflags: int, dry_run: bool,
              use_zone_attr: bool) -> dict:
        """One walk, repeated (at most MAX_RESIZE_REWALKS times) when the
        conntrack hash table was resized meanwhile: a dump running across a
        resize may skip entries, and a skipped entry must not survive."""
        buckets = _buckets()
        r = ll.delete_walk(h, filters, kflags, dry_run, use_zone_attr)
        for _ in range(MAX_RESIZE_REWALKS):
            now = _buckets()
            if now == buckets:
                break
            buckets = now
            r = _merge_walks(r, ll.delete_walk(h, filters, kflags, dry_run, use_zone_attr),
                             dry_run)
            r["resized"] = True
        return r

    # -- the eBPF zone index ------------------------------------------------------
    def _index(self) -> Optional[index_mod.ZoneIndex]:
        """The namespace's index if attached (by this or another process)."""
        if not index_mod.is_attached(self._path):
            if self._zone_index is not None:
                self._zone_index.close()
                self._zone_index = None
            return None
        caps = self.capabilities()
        if not caps.netfilter_bpf:
            return None
        if self._zone_index is None:
            try:
                ix = index_mod.ZoneIndex(
                    self._path, self.netns,
                    known=(caps.netfilter_bpf, caps.zoned_kfuncs, caps.index_error))
            except ConntrackError as exc:
                if exc.errno != _errno.EPROTO:
                    raise
                return None   # attached by another version: deletes walk meanwhile
            if ix.stale():  # pins of a gone namespace that had the same inode
                ix.detach()
                ix.close()
                return None
            self._zone_index = ix
        # PYCONNTRACK_DISABLE=zoned_kfuncs reaches the index too
        self._zone_index.zoned_kfuncs = self._zone_index.zoned_kfuncs_probed and \
            caps.zoned_kfuncs
        return self._zone_index

    def _index_state(self, f: Filter) -> IndexState:
        with self._lock:
            ix = self._index()
            if ix is None:
                return IndexState()
            refusal = index_mod.index_refusal(f)
            if refusal:
                return IndexState(attached=True, refusal=refusal)
            z = ix.zone(f.zone)
            seen: dict = {}
            blind = ix.blind_spot(self._h(), seen)
            count = seen["table_count"] if "table_count" in seen else ll.table_count(self._h())
            return IndexState(attached=True, refusal="", dirty=z["failed"], window=z["window"],
                              table_slots=_buckets() + count, blind=blind)

    def _resync(self, zone: int, plan: Plan, state: IndexState) -> None:
        with self._lock:
            ix = self._index()
            if ix is None:
                return
            if state.dirty:
                ix.resync_zone(self._h(), zone, plan.kflags)
            elif state.blind and not ix.blind_spot(self._h()).startswith(
                    ("an Open vSwitch", "could not", "nftables bridge", "tc act_ct")):
                ix.resync_all(self._h())  # the unseen entries are recorded now

    def attach_index(self, max_records: int = 0,
                     preallocate: bool = False) -> "index_mod.AttachResult":
        """Attach the eBPF zone index to this namespace (idempotent); one walk
        records the entries that already exist. ``preallocate`` takes the
        record map's whole memory at attach (``index status`` states it)
        for a cheaper hook on every new connection; by default memory follows
        the records. Raises KernelUnsupported with the reason where the kernel
        does not allow it, PermissionDenied where the caller's privileges do
        not."""
        caps = self.capabilities()
        if not caps.netfilter_bpf:
            cls = PermissionDenied if index_mod.refused_for_privileges(caps.index_error) \
                else KernelUnsupported
            raise cls(f"eBPF zone index unavailable: {caps.index_error}", 1, "index")
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 0:
            raise InvalidFilter(f"max_records must be a non-negative int, not {max_records!r}")
        if not isinstance(preallocate, bool):
            raise InvalidFilter(f"preallocate must be a bool, not {preallocate!r}")
        index_mod.gc()
        with self._lock:
            if self._zone_index is not None and (
                    (max_records and index_mod.capacity(max_records)
                     != self._zone_index.max_records())
                    or (preallocate and not self._zone_index.preallocated())):
                raise ConntrackError(index_mod.OTHER_LAYOUT, 34, "attach")
            if self._zone_index is None:
                self._zone_index = index_mod.ZoneIndex(
                    self._path, self.netns, max_records, caps.zoned_kfuncs, create=True,
                    known=(caps.netfilter_bpf, caps.zoned_kfuncs, caps.index_error),
                    preallocate=preallocate)
            return self._zone_index.attach(self._h(), _kflags(caps))

    def detach_index(self) -> bool:
        """Remove the index's hooks, maps and pins. False if none was attached."""
        with self._lock:
            ix = self._index()
            if ix is None:
                if index_mod.is_attached(self._path):   # by another version
                    index_mod.detach_pin_dir(index_mod.pin_dir(self._path))
                    return True
                index_mod.gc()
                return False
            ix.detach()
            ix.close()
            self._zone_index = None
        index_mod.gc()
        return True

    def index_status(self) -> dict:
        with self._lock:
            ix = self._index()
            if ix is None:
                caps = self.capabilities()
                other = caps.netfilter_bpf and index_mod.is_attached(self._path)
                return {"attached": False, "available": caps.netfilter_bpf,
                        "reason": index_mod.OTHER_VERSION if other
                        else caps.index_error or _not_attached_reason()}
            return {**ix.status(), "available": True,
                    "blind_spot": ix.blind_spot(self._h())}

    def index_audit(self, max_missing: int = 1000) -> dict:
        """Walk once and list live entries the index does not hold (entries made
        through ctnetlink or by OVS's datapath bypass the netfilter hooks)."""
        with self._lock:
            ix = self._index()
            if ix is None:
                raise KernelUnsupported("no eBPF zone index attached to this namespace")
            return ix.audit(self._h(), max_missing)

    def index_resync(self, force: bool = False) -> int:
        """One walk: record every live entry the index lacks and take the
        namespace's insert statistic as the new baseline, so the index vouches
        again after entries were made through ctnetlink or BPF (a delete that
        falls back for that reason does the same). Without ``force``, nothing
        is done while the index vouches. Returns records lost."""
        _check_bool("force", force)
        with self._lock:
            ix = self._index()
            if ix is None:
                raise KernelUnsupported("no eBPF zone index attached to this namespace")
            if not force and not ix.blind_spot(self._h()):
                return 0
            return ix.resync_all(self._h())

    # -- creating (tests, demo, benchmarks) ------------------------------------------
    def create_many(self, count: int, *, zone: int = 0, family: str = "ipv4",
                    proto: str | int = "udp", src: Optional[str] = None,
                    dst: Optional[str] = None, sport: int = 1024, dport: int = 80,
                    mark: int = 0, timeout: int = 3600, reply_src: Optional[str] = None,
                    reply_dst: Optional[str] = None, zone_dir: str = "both") -> int:
        """Create ``count`` entries in batches: the source port counts up from
        ``sport`` (to 65535), then the source address. ``zone_dir`` sets the
        zone for both directions (default) or one (``"orig"``, ``"reply"``).
        Returns the number created; raises ConntrackError if any create failed."""
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 0xFFFFFFFF:
            raise InvalidFilter(f"count must be a non-negative int, not {count!r}")
        fam = _family(family)
        z = _zone(zone)
        zd = _zone_dir(zone_dir)
        if zd != "both" and z == 0:
            raise InvalidFilter("zone 0 has no direction: zone_dir needs a non-zero zone")
        p = _proto(proto)
        if isinstance(sport, bool) or not isinstance(sport, int) or not 1 <= sport <= 65535:
            raise InvalidFilter(f"sport must be 1..65535, not {sport!r}")
        if isinstance(dport, bool) or not isinstance(dport, int) or not 0 <= dport <= 65535:
            raise InvalidFilter(f"dport must be 0..65535, not {dport!r}")
        for name, value in (("mark", mark), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= 0xFFFFFFFF:
                raise InvalidFilter(f"{name} must be an int 0..4294967295, not {value!r}")
        src = src or ("10.0.0.1" if fam == 4 else "fd00::1")
        dst = dst or ("192.0.2.1" if fam == 4 else "2001:db8::1")
        for name, value in (("src", src), ("dst", dst), ("reply_src", reply_src),
                            ("reply_dst", reply_dst)):
            if value is None:
                continue
            try:
                if ipaddress.ip_address(value).version != fam:
                    raise InvalidFilter(f"{name} {value} is not an ipv{fam} address")
            except ValueError:
                raise InvalidFilter(f"{name}: invalid IP address {value!r}") from None
        caps = self.capabilities()
        spec = dict(family=fam, proto=p, zone=z, src=src, dst=dst, sport_base=sport,
                    dport=dport, mark=mark, timeout=timeout, reply_src=reply_src,
                    reply_dst=reply_dst, use_zone=caps.send_zone, zone_dir=zd)
        created, failed, first = self._create_parallel(spec, count)
        if failed:
            reason = f": {os.strerror(first)}" if first else ""
            raise ConntrackError(f"{failed} of {count} creates failed{reason}", first,
                                 "pct_create")
        return created
