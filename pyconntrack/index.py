"""The eBPF zone index: which entries each zone holds, known without a walk.

A netfilter BPF program (Linux 6.4+) attached at PRE_ROUTING and LOCAL_OUT,
right after conntrack, records every new entry's zone and original tuple in
BPF maps laid out per zone; an XDP program run with BPF_PROG_TEST_RUN (zoned
conntrack kfuncs, Linux 6.11+) expires a zone's matching TCP/UDP entries and
unlinks them at once. Other protocols, and every protocol on kernels without
zoned kfuncs, are deleted from the records with batched netlink deletes. So a
zone cleanup costs O(entries of the zone), not O(table).

What the index cannot see: entries created through ctnetlink (conntrack -I,
an agent's own inserts) or by Open vSwitch's kernel datapath, which bypass the
netfilter hooks. ``audit()`` lists live entries missing from the index. If a
record cannot be stored (map full), its zone is marked dirty and deletes in it
fall back to a walk, after which the zone is resynchronised.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
from typing import Dict, Optional

from . import _lowlevel as ll
from .errors import KernelUnsupported
from .filter import Filter

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "pyconntrack")
LINK_PINS = ("link_ip4_pre", "link_ip4_out", "link_ip6_pre", "link_ip6_out")
DEFAULT_MAX_RECORDS = 262144
MAX_ZONES = 65536
# Measured on 6.18: a record is a 104-byte hash element served from
# kmalloc-128 (~136 B with allocator overhead), plus 16 B per hash bucket
# (buckets = max_records rounded up to a power of two), plus the 2.5 MiB
# per-zone table.
BYTES_PER_RECORD = 136
BYTES_PER_BUCKET = 16
ZONE_TABLE_BYTES = MAX_ZONES * 40

_open_lock = threading.Lock()


def _netns_inode(netns_path: Optional[str]) -> int:
    return os.stat(netns_path or "/proc/thread-self/ns/net").st_ino


def pin_dir(netns_path: Optional[str]) -> str:
    """Pins live per network namespace, keyed by its inode (stable while it exists)."""
    return os.path.join(PIN_ROOT, f"ns-{_netns_inode(netns_path)}")


def is_attached(netns_path: Optional[str]) -> bool:
    d = pin_dir(netns_path)
    return all(os.path.exists(os.path.join(d, name)) for name in LINK_PINS)


def _ensure_bpffs() -> None:
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == [BPFFS, "bpf"] for line in f if len(line.split()) > 2):
            return
    # fixed argv: nothing from the caller reaches this command
    subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True, capture_output=True)


def availability() -> tuple:
    """(available, zoned_kfuncs, reason): can the index run on this kernel as this user?"""
    nf_bpf, zoned, err = ll.index_probe()
    if nf_bpf:
        return True, zoned, ""
    if err in (1, 13):
        return False, zoned, "loading BPF programs needs CAP_BPF and CAP_NET_ADMIN (or root)"
    return False, zoned, ("this kernel has no netfilter BPF programs (Linux 6.4+ needed; "
                          f"probe load failed with errno {err})")


@dataclasses.dataclass
class AttachResult:
    pin_dir: str
    seeded: int
    lost: int
    already_attached: bool


class ZoneIndex:
    """The index of one network namespace (open an attached one, or attach)."""

    def __init__(self, netns_path: Optional[str], netns_label: Optional[str],
                 max_records: int = 0, known: Optional[tuple] = None) -> None:
        # known: availability() as the capability probe found it (saves a program load)
        ok, self.zoned_kfuncs, reason = known if known is not None else availability()
        if not ok:
            raise KernelUnsupported(f"eBPF zone index unavailable: {reason}")
        self.netns_path = netns_path
        self.netns_label = netns_label
        self.dir = pin_dir(netns_path)
        self._lock = threading.Lock()
        with _open_lock:
            _ensure_bpffs()
            os.makedirs(PIN_ROOT, mode=0o700, exist_ok=True)
            os.chmod(PIN_ROOT, 0o700)
            self._ix = ll.IndexHandle(self.dir, max_records)
        self._set_netns(attach=False)

    def _netns_fd(self) -> int:
        return os.open(self.netns_path or "/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _set_netns(self, attach: bool) -> None:
        fd = self._netns_fd()
        try:
            if attach:
                self._ix.attach(fd)
            else:
                self._ix.set_netns(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._ix.close()

    # -- attach / detach -------------------------------------------------------
    def attach(self, handle: "ll.Handle", kflags: int) -> AttachResult:
        """Attach the hooks, then walk once so entries that already exist are
        recorded too (records are idempotent: duplicates are harmless)."""
        if is_attached(self.netns_path):
            return AttachResult(self.dir, 0, 0, True)
        try:
            self._set_netns(attach=True)
            seeded, lost = ll.index_seed(handle, self._ix, Filter(), kflags)
        except BaseException:
            self.detach()  # a failed attach leaves no links, maps or directories
            raise
        return AttachResult(self.dir, seeded, lost, False)

    def detach(self) -> None:
        """Remove the links, the maps and the pin directories: nothing is left
        (the shared root stays while other namespaces have an index)."""
        self._ix.detach()
        self._ix.unpin()
        try:
            os.rmdir(PIN_ROOT)
        except OSError:
            pass  # not empty: another namespace's index lives there

    # -- reading ---------------------------------------------------------------
    def zone(self, zone: int) -> dict:
        z = self._ix.zone_stats(zone)
        z["window"] = z["head"] - z["tail"]
        return z

    def dirty(self, zone: int) -> int:
        """Records lost in this zone since its last resync (0: complete)."""
        return self._ix.zone_stats(zone)["failed"]

    def status(self) -> dict:
        zones: Dict[int, dict] = {}
        for z in range(MAX_ZONES):
            st = self._ix.zone_stats(z)
            if st["head"] != st["tail"] or st["failed"]:
                zones[z] = {"records": st["head"] - st["tail"], "dirty": st["failed"]}
        records = sum(v["records"] for v in zones.values())
        max_records = self._ix.max_records()
        buckets = 1 << max(0, (max_records - 1).bit_length()) if max_records else 0
        return {
            "attached": is_attached(self.netns_path),
            "pin_dir": self.dir,
            "zoned_kfuncs": self.zoned_kfuncs,
            "zones": zones,
            "dirty_zones": sorted(z for z, v in zones.items() if v["dirty"]),
            "records": records,
            "max_records": max_records,
            "memory_bytes": records * BYTES_PER_RECORD + buckets * BYTES_PER_BUCKET
            + ZONE_TABLE_BYTES,
            "bytes_per_record": BYTES_PER_RECORD,
            "hook_stats": self._ix.stats(),
        }

    def audit(self, handle: "ll.Handle", max_missing: int = 1000) -> dict:
        missing, checked, sample = ll.index_audit(handle, self._ix, max_missing)
        return {"checked": checked, "missing": missing, "entries": sample}

    # -- deleting --------------------------------------------------------------
    def delete(self, handle: "ll.Handle", f: Filter, use_zone_attr: bool) -> dict:
        with self._lock:  # one reaper per zone at a time
            return ll.index_delete(handle, self._ix, f, self.zoned_kfuncs, use_zone_attr)

    def delete_each(self, handle: "ll.Handle", fs, use_zone_attr: bool) -> list:
        """Many zoned filters, no walk: a result per filter (first match wins)."""
        with self._lock:
            return ll.index_delete_each(handle, self._ix, fs, self.zoned_kfuncs, use_zone_attr)

    def resync_zone(self, handle: "ll.Handle", zone: int, kflags: int) -> bool:
        """After a fallback walk: record the zone's live entries again and
        clear its dirty mark, unless more records were lost meanwhile."""
        with self._lock:
            lost_before = self._ix.zone_stats(zone)["failed"]
            if self.zoned_kfuncs:
                self._ix.prune(zone)  # free the slots of entries the walk deleted
            _, lost = ll.index_seed(handle, self._ix, Filter(zone=zone), kflags)
            if lost:
                return False
            return self._ix.clear_dirty(zone, lost_before) == lost_before


def index_refusal(f: Filter) -> str:
    """Why the index cannot evaluate this filter exactly ('' if it can)."""
    if f.zone is None:
        return "the index works per zone: the filter has no zone"
    if f.mark is not None:
        return "the index does not hold marks"
    if f.zone_dir is not None:
        return "the index does not hold zone directions"
    if f.reply_src is not None or f.reply_dst is not None:
        return "the index holds original tuples only (no reply side)"
    return ""


__all__ = ["ZoneIndex", "availability", "is_attached", "pin_dir", "index_refusal",
           "AttachResult"]
