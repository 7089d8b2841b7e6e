"""The only module that touches the cffi ``lib``: conversions between Python
values and the shim's structs, and errno checks."""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterator, List, Optional, Sequence

from ._pct import ffi, lib
from .errors import ConntrackError, from_errno
from .filter import Filter
from .types import Capabilities, Entry, TCP_STATES

ABI_VERSION = 2
DUMP_BATCH = 1024

if lib.PCT_ABI_VERSION != ABI_VERSION:  # a stale build next to newer Python code
    raise ImportError(f"pyconntrack._pct ABI {lib.PCT_ABI_VERSION} != {ABI_VERSION}: rebuild")

K_FAMILY = lib.PCT_K_FAMILY
# the index's record map: chunks of this many slots, each this big
CHUNK_SLOTS = lib.CTI_CHUNK_SLOTS
CHUNK_BYTES = ffi.sizeof("struct cti_chunk")
# the tuples of records a walk added: chunks of this many, each this big
TUPLE_SLOTS = lib.CTI_TUPLE_SLOTS
TUPLE_CHUNK_BYTES = ffi.sizeof("struct cti_tuple_chunk")
# the per-zone table: one of these per zone id
ZONE_BYTES = ffi.sizeof("struct cti_zone")
META_VERSION = lib.CTI_META_VERSION
# where the index's hook is linked: (protocol family, netfilter hook), priority
INDEX_HOOKS = [(pf, hook) for pf in (lib.CTI_NFPROTO_IPV4, lib.CTI_NFPROTO_IPV6)
               for hook in (lib.CTI_NF_INET_PRE_ROUTING, lib.CTI_NF_INET_LOCAL_OUT)]
INDEX_HOOK_PRIORITY = lib.CTI_PRIORITY
NETFILTER_PROG_TYPE = lib.CTI_PROG_TYPE_NETFILTER
NETFILTER_ATTACH_TYPE = lib.CTI_ATTACH_NETFILTER
K_MARK = lib.PCT_K_MARK
K_ZONE = lib.PCT_K_ZONE
K_TUPLE_V4 = lib.PCT_K_TUPLE_V4
K_TUPLE_V6 = lib.PCT_K_TUPLE_V6

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
ZONE_DIR_C = {"both": lib.PCT_ZONE_BOTH, "orig": lib.PCT_ZONE_ORIG, "reply": lib.PCT_ZONE_REPLY}
_ZONE_DIR_NAME = {v: k for k, v in ZONE_DIR_C.items()}
_FAMILY_NAME = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


def check(rc: int, operation: str, netns: Optional[str] = None) -> int:
    if rc < 0:
        raise from_errno(rc, operation, netns)
    return rc


class _Owned:
    """A C object freed by the garbage collector or, deterministically, close()."""

    _obj = None
    what = "handle"

    def close(self) -> None:
        if self._obj is not None:
            ffi.release(self._obj)
            self._obj = None

    @property
    def raw(self):
        if self._obj is None:
            raise ConntrackError(f"{self.what} is closed", None, None)
        return self._obj


class Handle(_Owned):
    """Two ctnetlink sockets bound in one network namespace."""

    def __init__(self, netns_path: Optional[str], netns_label: Optional[str]) -> None:
        out = ffi.new("struct pct_handle **")
        path = ffi.NULL if netns_path is None else netns_path.encode()
        check(lib.pct_open(path, out), "pct_open", netns_label)
        self._obj = ffi.gc(out[0], lib.pct_close)
        self.netns = netns_label

    @property
    def closed(self) -> bool:
        return self._obj is None


def _put_prefix(dst, net) -> None:
    packed = net.network_address.packed
    ffi.memmove(dst.addr, packed, len(packed))
    dst.plen = net.prefixlen


def to_c_filter(f: Filter, out=None):
    c = out if out is not None else ffi.new("struct pct_filter *")
    fields = 0
    if f.zone is not None:
        fields |= lib.PCT_F_ZONE
        c.zone = f.zone
    if f.zone_dir is not None:
        fields |= lib.PCT_F_ZONE_DIR
        c.zone_dir = ZONE_DIR_C[f.zone_dir]
    if f.family is not None:
        fields |= lib.PCT_F_FAMILY
        c.family = _AF[f.family]
    if f.proto is not None:
        fields |= lib.PCT_F_PROTO
        c.proto = f.proto
    for name, flag in (("src", lib.PCT_F_SRC), ("dst", lib.PCT_F_DST), ("addr", lib.PCT_F_ADDR),
                       ("reply_src", lib.PCT_F_REPLY_SRC), ("reply_dst", lib.PCT_F_REPLY_DST)):
        net = getattr(f, name)
        if net is not None:
            fields |= flag
            _put_prefix(getattr(c, name), net)
    if f.sport is not None:
        fields |= lib.PCT_F_SPORT
        c.sport_lo, c.sport_hi = f.sport
    if f.dport is not None:
        fields |= lib.PCT_F_DPORT
        c.dport_lo, c.dport_hi = f.dport
    if f.mark is not None:
        fields |= lib.PCT_F_MARK
        c.mark, c.mark_mask = f.mark
    c.fields = fields
    return c


def _addr(family: int, raw) -> "ipaddress.IPv4Address | ipaddress.IPv6Address":
    if family == socket.AF_INET6:
        return ipaddress.IPv6Address(bytes(ffi.buffer(raw, 16)))
    return ipaddress.IPv4Address(bytes(ffi.buffer(raw, 4)))


def _entry(e) -> Entry:
    fam = e.family
    ports = bool(e.has_ports)
    icmp = e.proto in (1, 58)
    return Entry(
        family=_FAMILY_NAME.get(fam, str(fam)), proto=e.proto, zone=e.zone,
        src=_addr(fam, e.orig_src), dst=_addr(fam, e.orig_dst),
        sport=e.orig_sport if ports else None, dport=e.orig_dport if ports else None,
        reply_src=_addr(fam, e.reply_src), reply_dst=_addr(fam, e.reply_dst),
        reply_sport=e.reply_sport if ports else None,
        reply_dport=e.reply_dport if ports else None,
        icmp_type=e.icmp_type if icmp else None, icmp_code=e.icmp_code if icmp else None,
        icmp_id=e.icmp_id if icmp else None,
        mark=e.mark, status=e.status, timeout=e.timeout,
        tcp_state=(TCP_STATES[e.tcp_state] if e.tcp_state < len(TCP_STATES) else str(e.tcp_state))
        if e.proto == 6 else None,
        id=e.id,
        zone_dir=_ZONE_DIR_NAME.get(e.zone_dir, str(e.zone_dir)),
    )


def dump(h: Handle, f: Filter, kflags: int) -> Iterator[Entry]:
    """Stream matching entries; the kernel sends them in batches that the shim
    filters and hands over DUMP_BATCH at a time."""
    cf = to_c_filter(f)
    buf = ffi.new("struct pct_entry[]", DUMP_BATCH)
    check(lib.pct_dump_start(h.raw, cf, kflags), "pct_dump_start", h.netns)
    finished = False
    try:
        while True:
            n = check(lib.pct_dump_next(h.raw, buf, DUMP_BATCH), "pct_dump_next", h.netns)
            if n == 0:
                finished = True
                return
            for i in range(n):
                yield _entry(buf[i])
    finally:
        if not finished and not h.closed:
            lib.pct_dump_abort(h.raw)


def count(h: Handle, f: Filter, kflags: int) -> int:
    return check(lib.pct_count(h.raw, to_c_filter(f), kflags), "pct_count", h.netns)


def delete_walk(h: Handle, filters: Sequence[Filter], kflags: int, dry_run: bool,
                use_zone_attr: bool) -> dict:
    cfs = ffi.new("struct pct_filter[]", len(filters))
    for i, f in enumerate(filters):
        to_c_filter(f, cfs[i])
    res = ffi.new("struct pct_delete_result *")
    per = ffi.new("struct pct_delete_result[]", len(filters))
    rc = lib.pct_delete_walk(h.raw, cfs, len(filters), kflags, int(dry_run),
                             int(use_zone_attr), res, per)
    check(rc, "pct_delete_walk", h.netns)
    out = _result_dict(res)
    out["dumped"] = res.dumped
    out["per_filter"] = [_result_dict(per[i]) for i in range(len(filters))]
    return out


def _result_dict(res) -> dict:
    return {"matched": res.matched, "deleted": res.deleted, "already_gone": res.already_gone,
            "failed": res.failed, "errno": res.first_errno, "walks": res.walks}


def flush(h: Handle, f: Filter) -> None:
    check(lib.pct_flush(h.raw, to_c_filter(f)), "pct_flush", h.netns)


def table_count(h: Handle) -> int:
    return check(lib.pct_table_count(h.raw), "pct_table_count", h.netns)


def create(h: Handle, *, family: int, proto: int, zone: int, src: str, dst: str,
           sport_base: int, dport: int, count: int, mark: int, timeout: int,
           reply_src: Optional[str], reply_dst: Optional[str], use_zone: bool,
           first: int = 0, zone_dir: str = "both") -> tuple:
    spec = ffi.new("struct pct_create_spec *")
    spec.family = _AF[family]
    spec.proto = proto
    spec.zone = zone
    spec.zone_dir = ZONE_DIR_C[zone_dir]
    for name, value in (("src", src), ("dst", dst), ("reply_src", reply_src),
                        ("reply_dst", reply_dst)):
        if value is not None:
            packed = ipaddress.ip_address(value).packed
            ffi.memmove(getattr(spec, name), packed, len(packed))
    spec.sport_base = sport_base
    spec.dport = dport
    spec.mark = mark
    spec.timeout = timeout
    spec.first = first
    spec.count = count
    spec.use_zone = int(use_zone)
    failed = ffi.new("unsigned long long *")
    first = ffi.new("int *")
    created = check(lib.pct_create(h.raw, spec, failed, first), "pct_create", h.netns)
    return created, failed[0], first[0]


def probe() -> Capabilities:
    caps = ffi.new("struct pct_caps *")
    rc = lib.pct_probe(caps)
    if rc < 0:
        err = from_errno(rc, "pct_probe")
        return Capabilities(probed=False, probe_error=str(err))
    names = ("zones", "dump_zone", "flush_zone", "flush_family", "flush_mark", "dump_mark",
             "dump_filter_v4", "dump_filter_v6", "dump_filter_v6_inverted", "flush_filter")
    values = {n: bool(getattr(caps, n)) for n in names}
    error = ""
    if caps.probe_errno:
        error = str(from_errno(-caps.probe_errno, "pct_probe"))
    return Capabilities(probed=bool(caps.probed), probe_error=error, **values)


def c_match(f: Filter, entry_fields: dict) -> bool:
    """Run the shim's matcher on a synthetic entry (unit tests of the C check)."""
    cf = to_c_filter(f)
    e = ffi.new("struct pct_entry *")
    fam = entry_fields["family"]
    e.family = _AF[fam]
    e.proto = entry_fields.get("proto", 0)
    e.zone = entry_fields.get("zone", 0)
    e.zone_dir = ZONE_DIR_C[entry_fields.get("zone_dir", "both")]
    e.mark = entry_fields.get("mark", 0)
    for name in ("orig_src", "orig_dst", "reply_src", "reply_dst"):
        packed = ipaddress.ip_address(entry_fields[name]).packed
        ffi.memmove(getattr(e, name), packed, len(packed))
    if entry_fields.get("sport") is not None:
        e.has_ports = 1
        e.orig_sport = entry_fields["sport"]
        e.orig_dport = entry_fields["dport"]
    return bool(lib.pct_match(cf, e))


def sizes() -> List[int]:
    """sizeof every struct the shim shares (layout smoke test)."""
    return [ffi.sizeof(t) for t in ("struct pct_filter", "struct pct_entry", "struct pct_caps",
                                    "struct pct_delete_result", "struct pct_create_spec")]


def _put_addr(dst, text) -> None:
    packed = text.packed
    ffi.memmove(dst, packed, len(packed))


def delete_entries(h: Handle, entries: Sequence[Entry], use_zone_attr: bool) -> dict:
    """Delete exactly these entries: tuple + zone + id, so a newer connection
    that reuses a tuple survives (ENOENT counts as already gone)."""
    arr = ffi.new("struct pct_entry[]", max(len(entries), 1))
    for i, e in enumerate(entries):
        c = arr[i]
        c.family = _AF[4 if e.family == "ipv4" else 6]
        c.proto = e.proto
        c.zone = e.zone
        c.zone_dir = ZONE_DIR_C[e.zone_dir]
        c.id = e.id
        _put_addr(c.orig_src, e.src)
        _put_addr(c.orig_dst, e.dst)
        _put_addr(c.reply_src, e.reply_src)   # a reply-only zone is looked up by these
        _put_addr(c.reply_dst, e.reply_dst)
        if e.sport is not None:
            c.has_ports = 1
            c.orig_sport = e.sport
            c.orig_dport = e.dport
            c.reply_sport = e.reply_sport if e.reply_sport is not None else e.dport
            c.reply_dport = e.reply_dport if e.reply_dport is not None else e.sport
        if e.icmp_type is not None:
            c.icmp_type, c.icmp_code, c.icmp_id = e.icmp_type, e.icmp_code, e.icmp_id
    res = ffi.new("struct pct_delete_result *")
    rc = lib.pct_delete_entries(h.raw, arr, len(entries), int(use_zone_attr), res)
    check(rc, "pct_delete_entries", h.netns)
    return {"matched": res.matched, "deleted": res.deleted, "already_gone": res.already_gone,
            "failed": res.failed, "errno": res.first_errno, "walks": 0}


# -- the eBPF zone index --------------------------------------------------------

def index_probe() -> tuple:
    """(netfilter_bpf, zoned_kfuncs, errno of the program-load probe)."""
    nf = ffi.new("int *")
    zk = ffi.new("int *")
    rc = lib.cti_probe(nf, zk)
    return bool(nf[0]), bool(zk[0]), -rc if rc < 0 else 0


def remove_index_pins(pin_dir: str) -> None:
    """Unpin everything the index loader pins in one namespace's directory
    (links first), then the directory: for an index that cannot be opened
    (its namespace is gone)."""
    check(lib.cti_remove_pins(pin_dir.encode()), "cti_remove_pins")


def index_log() -> str:
    return ffi.string(lib.cti_last_log()).decode(errors="replace").strip()


class IndexHandle(_Owned):
    """The index's programs and pinned maps for one network namespace."""

    what = "index handle"

    def __init__(self, pin_dir: str, max_records: int = 0, preallocate: bool = False) -> None:
        out = ffi.new("struct cti **")
        rc = lib.cti_open(pin_dir.encode(), max_records,
                          lib.CTI_OPEN_PREALLOC if preallocate else 0, out)
        if rc < 0:
            err = from_errno(rc, "cti_open")
            log = index_log()
            if log:
                err.args = (f"{err.args[0]}: {log.splitlines()[-1]}",)
            raise err
        self._obj = ffi.gc(out[0], lib.cti_close)

    def attach(self, netns_fd: int) -> None:
        check(lib.cti_attach(self.raw, netns_fd), "cti_attach")

    def set_netns(self, netns_fd: int) -> None:
        check(lib.cti_set_netns(self.raw, netns_fd), "cti_set_netns")

    def detach(self) -> None:
        check(lib.cti_detach(self.raw), "cti_detach")

    def unpin(self) -> None:
        check(lib.cti_unpin(self.raw), "cti_unpin")

    def zone_stats(self, zone: int) -> dict:
        z = ffi.new("struct cti_zone *")
        check(lib.cti_zone_stats(self.raw, zone, z), "cti_zone_stats")
        return {"head": z.head, "done": z.done, "tail": z.tail, "failed": z.failed,
                "added": z.added, "removed": z.removed, "busy": z.busy, "moves": z.moves,
                "pruned": z.pruned}

    def stats(self) -> dict:
        s = ffi.new("struct cti_stats *")
        check(lib.cti_stats(self.raw, s), "cti_stats")
        return {k: getattr(s, k) for k in ("seen", "no_ct", "confirmed", "recorded", "failed",
                                           "read_err", "seeded", "removed", "tuple_chunks")}

    def meta(self) -> dict:
        m = ffi.new("struct cti_meta *")
        check(lib.cti_meta_get(self.raw, m), "cti_meta_get")
        return {k: getattr(m, k) for k in ("insert_base", "netns_cookie", "attached_ns",
                                           "version")}

    def set_meta(self, **values) -> None:
        m = ffi.new("struct cti_meta *")
        check(lib.cti_meta_get(self.raw, m), "cti_meta_get")
        for k, v in values.items():
            setattr(m, k, v)
        check(lib.cti_meta_set(self.raw, m), "cti_meta_set")

    def max_records(self) -> int:
        return check(lib.cti_max_records(self.raw), "cti_max_records")

    def preallocated(self) -> bool:
        return bool(lib.cti_preallocated(self.raw))

    def expired_recent(self) -> int:
        return check(lib.cti_expired_recent(self.raw), "cti_expired_recent")

    def clear_dirty(self, zone: int, expected: int) -> int:
        return check(lib.cti_clear_dirty(self.raw, zone, expected), "cti_clear_dirty")

    def add_record(self, zone: int, family: int, proto: int, src: str, dst: str, sport: int,
                   dport: int, zone_dir: int = 3) -> int:
        """Append one record as a walk would (tests: stale records)."""
        r = ffi.new("struct cti_record *")
        _put_addr(r.saddr, ipaddress.ip_address(src))
        _put_addr(r.daddr, ipaddress.ip_address(dst))
        r.family = _AF[family]
        r.proto = proto
        r.sport = socket.htons(sport)
        r.dport = socket.htons(dport)
        r.zone = zone
        r.zone_dir = zone_dir
        r.hook = 255
        return check(lib.cti_add_records(self.raw, zone, r, 1), "cti_add_records")

    def prune(self, zone: int) -> dict:
        r = ffi.new("struct cti_reap_result *")
        check(lib.cti_prune_zone(self.raw, zone, 0, r), "cti_prune_zone")
        return {k: getattr(r, k) for k in ("deleted", "gone", "kept", "unsupported", "visited",
                                           "runs")}


def index_check_dir(path: str) -> int:
    """0, or -errno: -ENOTDIR (not a real directory: symlink, file), -EPERM
    (not ours or not mode 0700), -ENOENT."""
    return lib.cti_check_dir(path.encode())


def netns_cookie(netns_fd: int) -> int:
    out = ffi.new("unsigned long long *")
    check(lib.cti_netns_cookie(netns_fd, out), "cti_netns_cookie")
    return out[0]


def index_blind_spots(h: Handle, netns_path: Optional[str]) -> dict:
    insert = ffi.new("unsigned long long *")
    ovs = ffi.new("int *")
    bridge = ffi.new("int *")
    check(lib.pct_index_blind_spots(h.raw, netns_path.encode() if netns_path else ffi.NULL,
                                    insert, ovs, bridge), "pct_index_blind_spots", h.netns)
    return {"insert": insert[0], "ovs_datapaths": ovs[0], "bridge_tables": bridge[0]}


def _bpf_filter(f: Filter):
    bf = ffi.new("struct cti_filter *")
    flags = 0
    if f.family is not None:
        flags |= lib.CTI_F_FAMILY
        bf.family = _AF[f.family]
    if f.proto is not None:
        flags |= lib.CTI_F_PROTO
        bf.proto = f.proto
    if f.sport is not None:
        flags |= lib.CTI_F_SPORT
        bf.sport_lo, bf.sport_hi = f.sport
    if f.dport is not None:
        flags |= lib.CTI_F_DPORT
        bf.dport_lo, bf.dport_hi = f.dport
    for name, flag, value, mask in (("src", lib.CTI_F_SRC, bf.src, bf.src_mask),
                                    ("dst", lib.CTI_F_DST, bf.dst, bf.dst_mask),
                                    ("addr", lib.CTI_F_ADDR, bf.addr, bf.addr_mask)):
        net = getattr(f, name)
        if net is None:
            continue
        flags |= flag
        ffi.memmove(value, net.network_address.packed, len(net.network_address.packed))
        ffi.memmove(mask, net.netmask.packed, len(net.netmask.packed))
    bf.flags = flags
    return bf


def index_seed(h: Handle, ix: IndexHandle, f: Filter, kflags: int) -> tuple:
    lost = ffi.new("long long *")
    seen = check(lib.pct_index_seed(h.raw, ix.raw, to_c_filter(f), kflags, lost),
                 "pct_index_seed", h.netns)
    return seen, lost[0]


WALK_FIELDS = ("entries", "recorded", "lost", "foreign", "skipped", "restarts", "nodes",
               "runs", "buckets")


def index_walk(h: Handle, ix: IndexHandle, netns_path: Optional[str], threads: int) -> dict:
    """Record the namespace's existing entries from conntrack's table, read in
    BPF; raises ConntrackError (its errno says why the walk could not run)."""
    res = ffi.new("struct cti_walk_result *")
    path = ffi.NULL if netns_path is None else netns_path.encode()
    check(lib.pct_index_walk(h.raw, ix.raw, path, threads, res), "pct_index_walk", h.netns)
    return {k: getattr(res, k) for k in WALK_FIELDS}


def index_delete(h: Handle, ix: IndexHandle, f: Filter, use_kfuncs: bool,
                 use_zone_attr: bool) -> dict:
    res = ffi.new("struct pct_delete_result *")
    unsure = ffi.new("unsigned long long *")
    rc = lib.pct_index_delete(h.raw, ix.raw, to_c_filter(f), _bpf_filter(f), int(use_kfuncs),
                              int(use_zone_attr), res, unsure)
    check(rc, "pct_index_delete", h.netns)
    out = _result_dict(res)
    out["walks"] = 0
    out["unsure"] = unsure[0]
    return out


def index_delete_each(h: Handle, ix: IndexHandle, filters: Sequence[Filter], use_kfuncs: bool,
                      use_zone_attr: bool) -> tuple:
    cfs = ffi.new("struct pct_filter[]", len(filters))
    for i, f in enumerate(filters):
        to_c_filter(f, cfs[i])
    res = ffi.new("struct pct_delete_result *")
    per = ffi.new("struct pct_delete_result[]", len(filters))
    unsure = ffi.new("unsigned long long *")
    rc = lib.pct_index_delete_each(h.raw, ix.raw, cfs, len(filters), int(use_kfuncs),
                                   int(use_zone_attr), res, per, unsure)
    check(rc, "pct_index_delete_each", h.netns)
    return [_result_dict(per[i]) for i in range(len(filters))], unsure[0]


def index_audit(h: Handle, ix: IndexHandle, max_missing: int = 1000,
                add: bool = False) -> tuple:
    buf = ffi.new("struct pct_entry[]", max(max_missing, 1))
    checked = ffi.new("unsigned long long *")
    lost = ffi.new("long long *")
    n = check(lib.pct_index_audit(h.raw, ix.raw, buf, max_missing, checked, int(add), lost),
              "pct_index_audit", h.netns)
    return n, checked[0], [_entry(buf[i]) for i in range(min(n, max_missing))], lost[0]
