"""The eBPF zone index: which entries each zone holds, known without a walk.

A netfilter BPF program (Linux 6.4+) attached at PRE_ROUTING and LOCAL_OUT,
right after conntrack, records every new entry's zone and original tuple in
BPF maps laid out per zone; an XDP program run with BPF_PROG_TEST_RUN (zoned
conntrack kfuncs, Linux 6.11+) expires a zone's matching TCP/UDP entries and
unlinks them at once. Other protocols, and every protocol on kernels without
zoned kfuncs, are deleted from the records with batched netlink deletes. So a
zone cleanup costs O(entries of the zone), not O(table).

What the hooks cannot see: entries created through ctnetlink (conntrack -I,
an agent's own inserts), by bpf_ct_insert_entry, by Open vSwitch's kernel
datapath, by tc act_ct or by bridge conntrack. Before every delete
``blind_spot()`` checks, without a walk, whether any of them may have made
entries since the index was last synchronised (the namespace's "insert"
statistic, OVS datapaths and nftables bridge tables in the namespace, act_ct,
the namespace's entry count against the records); if so the delete falls back
to the walk or flush, saying why, and the index is resynchronised. If a record
cannot be stored (map full), its zone is marked dirty and deletes in it fall
back likewise.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import stat
import subprocess
import threading
import time
from typing import Dict, List, Optional

from . import _lowlevel as ll
from .errors import ConntrackError, KernelUnsupported, PermissionDenied
from .filter import Filter

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "pyconntrack")
# Tests may point the pin root elsewhere (a directory inside a bpffs).
PIN_ROOT_ENV = "PYCONNTRACK_PIN_ROOT"
LINK_PINS = ("link_ip4_pre", "link_ip4_out", "link_ip6_pre", "link_ip6_out")
# the reaper program, pinned per build of the BPF object (bpf/ct_index_loader.c):
# opening an attached index then loads and verifies nothing
REAPER_PIN_PREFIX = "prog_reap_"
# The attach reads conntrack's table in BPF on this many threads (parts of
# the table in parallel); where that walk cannot run, it dumps the table:
# opened from the pins (no walk program), no TCP/UDP entry to find the table
# by, or the table not where a chain said (resized meanwhile).
WALK_THREADS = 2
WALK_UNAVAILABLE = (errno.EOPNOTSUPP, errno.ENOENT, errno.ESTALE, errno.EFAULT, errno.E2BIG)
DEFAULT_MAX_RECORDS = 262144
MAX_ZONES = 65536
# Records live in chunks of CHUNK_SLOTS consecutive slots of a zone: one hash
# element of 1,736 B (the 48 B element header, the key, 70 slots of 24 B)
# per chunk, served from the 2 KiB size class when allocated as recorded,
# plus 16 B per hash bucket (buckets = the map's chunks rounded up to a power
# of two), plus the 5 MiB per-zone table (80 B per zone). The map has room
# for the partly used chunks of the zones in use too (chunks_for); a
# preallocated map (--preallocate) holds every chunk from the start. A
# record made by the hook is its entry's address; one a walk added (attach,
# resync) keeps its tuple in a second map, 35 to a 2 KiB element,
# made as walks add records (never preallocated), with twice the buckets.
CHUNK_SLOTS = ll.CHUNK_SLOTS
# the tuple map's elements per chunk of slots (its bound: every record a walk's)
TUPLE_CHUNKS_PER_CHUNK = CHUNK_SLOTS // ll.TUPLE_SLOTS
BYTES_PER_PREALLOCATED_CHUNK = 48 + 8 + ll.CHUNK_BYTES


def _size_class(element_bytes: int) -> int:
    """What an element allocated as recorded takes: its power-of-two size class."""
    return 1 << (element_bytes - 1).bit_length()


BYTES_PER_CHUNK = _size_class(BYTES_PER_PREALLOCATED_CHUNK)
BYTES_PER_TUPLE_CHUNK = _size_class(48 + 8 + ll.TUPLE_CHUNK_BYTES)
# the record map makes room for two partly used chunks in each of as many
# zones as there are this many records (chunks_for in bpf/ct_index_loader.c)
RECORDS_PER_ZONE = 20
# what attaching again with another size or kind of record map says
OTHER_LAYOUT = ("the index of this namespace is attached with another --max-records "
                "or without --preallocate; detach it first to change them")
BYTES_PER_BUCKET = 16
# what an index attached by a version with another record layout says
OTHER_VERSION = ("the index of this namespace was attached by another version of pyconntrack "
                 "(another record layout): deletes walk the table meanwhile; attach again "
                 "(it replaces that index) or detach it")
ZONE_TABLE_BYTES = MAX_ZONES * ll.ZONE_BYTES
BPF_FS_MAGIC = 0xCAFE4A11

_open_lock = threading.Lock()


class PinRootRefused(ConntrackError):
    """The pin root or a namespace's pin directory is not one we made."""


@functools.lru_cache(maxsize=1)
def _statfs():
    """libc's statfs, loaded once: every ctypes.CDLL makes new function
    classes that are never freed (1,000 cleanups grew the heap by 100 KB)."""
    return ctypes.CDLL(None, use_errno=True).statfs


def _fs_magic(path: str) -> int:
    buf = ctypes.create_string_buffer(256)
    if _statfs()(os.fsencode(path), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def _host_view() -> Optional[str]:
    """The root directory of the mount namespace we were started from, when
    ours is a private one (``ip netns exec`` unshares the mount namespace and
    mounts a fresh /sys): the first ancestor in another mount namespace (init
    if it can be read). None when we share the mount namespace of every
    ancestor we can see."""
    try:
        mine = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None
    pid = os.getppid()
    seen = 0
    while pid > 0 and seen < 64:
        seen += 1
        try:
            if os.stat(f"/proc/{pid}/ns/mnt").st_ino != mine:
                return f"/proc/{pid}/root"
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    try:
        if os.stat("/proc/1/ns/mnt").st_ino != mine:
            return "/proc/1/root"
    except OSError:
        pass
    return None


def bpffs_dir(mount: bool = False) -> str:
    """The host's bpffs. Under ``ip netns exec`` (a private mount namespace
    with a fresh /sys) it is reached through the root of the namespace we
    were started from; a bpffs of our own would be thrown away with the mount
    namespace, so none is ever used or mounted there. A bpffs mounted at
    /sys/fs/bpf in our own mount namespace always wins: it is what every
    other tool here (bpftool, a container's agent, a chroot) sees; only
    where there is none (ip netns exec's fresh /sys) do we look outside.
    ``mount``: mount one (mode 0700) at /sys/fs/bpf when the host has none."""
    if _fs_magic(BPFFS) == BPF_FS_MAGIC:
        return BPFFS
    host = _host_view()
    if host is not None:
        path = host + BPFFS
        if _fs_magic(path) == BPF_FS_MAGIC:
            return path
        raise PinRootRefused(
            "the host's bpffs is not visible from this mount namespace (ip netns exec "
            "mounts a private /sys): run pyconntrack with --netns instead", errno.ENOENT,
            "bpffs")
    if not mount:
        raise PinRootRefused(f"no bpffs mounted at {BPFFS}", errno.ENOENT, "bpffs")
    # fixed argv: nothing from the caller reaches this command
    subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", BPFFS], check=True,
                   capture_output=True)
    return BPFFS


def pin_root(mount: bool = False) -> str:
    override = os.environ.get(PIN_ROOT_ENV)
    if override:
        if not os.path.isabs(override) or _fs_magic(os.path.dirname(override)) != BPF_FS_MAGIC:
            raise PinRootRefused(f"{PIN_ROOT_ENV}={override}: not inside a bpffs",
                                 errno.EINVAL, "bpffs")
        return override
    return os.path.join(bpffs_dir(mount), "pyconntrack")


def _check_private_dir(path: str, what: str) -> bool:
    """True if path is a real directory owned by us (root) with mode 0700,
    False if it does not exist; raises PinRootRefused for anything else
    (symlink, file, another owner, other modes) without touching it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise PinRootRefused(f"refusing {what} {path}: it is a symlink", errno.ELOOP, "pins")
    if not stat.S_ISDIR(st.st_mode):
        raise PinRootRefused(f"refusing {what} {path}: not a directory", errno.ENOTDIR, "pins")
    if st.st_uid != os.geteuid():
        raise PinRootRefused(f"refusing {what} {path}: owned by uid {st.st_uid}, not "
                             f"{os.geteuid()}", errno.EPERM, "pins")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise PinRootRefused(f"refusing {what} {path}: mode {stat.S_IMODE(st.st_mode):04o}, "
                             "not 0700", errno.EPERM, "pins")
    return True


def _make_private_dir(path: str, what: str) -> None:
    if _check_private_dir(path, what):
        return
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # raced: whatever is there now must pass the checks
    else:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o700)  # whatever the umask
        finally:
            os.close(fd)
    if not _check_private_dir(path, what):
        raise PinRootRefused(f"{what} {path} vanished while being made", errno.ENOENT, "pins")


def _netns_inode(netns_path: Optional[str]) -> int:
    return os.stat(netns_path or "/proc/thread-self/ns/net").st_ino


def pin_dir(netns_path: Optional[str], root: Optional[str] = None) -> str:
    """Pins live per network namespace, keyed by its inode (stable while it exists)."""
    return os.path.join(root or pin_root(), f"ns-{_netns_inode(netns_path)}")


def trusted_pin_dir(netns_path: Optional[str]) -> Optional[str]:
    """The namespace's pin directory if the pin root is ours (None when there
    is no bpffs, no root, or a root we refuse: no index of ours can be there)."""
    try:
        root = pin_root()
        if not _check_private_dir(root, "pin root"):
            return None
        d = pin_dir(netns_path, root)
        if not _check_private_dir(d, "pin directory"):
            return None
        return d
    except PinRootRefused:
        return None


def is_attached(netns_path: Optional[str]) -> bool:
    d = trusted_pin_dir(netns_path)
    return d is not None and all(os.path.exists(os.path.join(d, name)) for name in LINK_PINS)


def availability() -> tuple:
    """(available, zoned_kfuncs, reason): can the index run on this kernel as this user?"""
    nf_bpf, zoned, err = ll.index_probe()
    if nf_bpf:
        return True, zoned, ""
    if err in (1, 13):
        return False, zoned, "loading BPF programs needs CAP_BPF and CAP_NET_ADMIN (or root)"
    return False, zoned, ("this kernel has no netfilter BPF programs (Linux 6.4+ needed; "
                          f"probe load failed with errno {err})")


def refused_for_privileges(reason: str) -> bool:
    return "CAP_BPF" in reason


def _full_chunks(max_records: int) -> int:
    return -(-max_records // CHUNK_SLOTS)


def chunks_for(max_records: int) -> int:
    """Chunks of the record map for max_records records (chunks_for in
    bpf/ct_index_loader.c): a zone's records fill chunks of their own, so a
    zone in use also holds one or two partly used chunks; the records' full
    chunks, plus two for each of as many zones as there are RECORDS_PER_ZONE
    records."""
    zones = -(-max_records // RECORDS_PER_ZONE)
    return _full_chunks(max_records) + 2 * min(zones, MAX_ZONES)


def capacity(max_records: int) -> int:
    """Records an index asked for max_records is sized for (records_for in
    bpf/ct_index_loader.c): the most records chunks_for() fits in its
    chunks, spread over zones of RECORDS_PER_ZONE records or more."""
    chunks = chunks_for(max_records)
    lo, hi = 0, chunks * CHUNK_SLOTS
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chunks_for(mid) <= chunks:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _buckets(elements: int) -> int:
    return 1 << max(0, (elements - 1).bit_length()) if elements else 0


def _bucket_bytes(max_records: int) -> int:
    """The hash buckets of the record map (its chunks rounded up to a power
    of two) and of the tuple map."""
    chunks = chunks_for(max_records)
    return (_buckets(chunks) + _buckets(TUPLE_CHUNKS_PER_CHUNK * chunks)) * BYTES_PER_BUCKET


def preallocation_bytes(max_records: int) -> int:
    """What ``--preallocate`` takes at attach: every chunk, and the buckets."""
    return chunks_for(max_records) * BYTES_PER_PREALLOCATED_CHUNK + _bucket_bytes(max_records)


def _mem_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_max_records() -> int:
    """Follow the kernel's table: nf_conntrack_max + 25 % (at least the
    historical default), so a full table fits."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            ct_max = int(f.read())
    except (OSError, ValueError):
        ct_max = 0
    return max(DEFAULT_MAX_RECORDS, min(ct_max + ct_max // 4, 1 << 26))


# -- namespaces that are gone ------------------------------------------------------

def _live_netns_inodes() -> set:
    """Inodes of every network namespace something still refers to: a task,
    an open fd, or an nsfs mount (ip netns add, container runtimes)."""
    live = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        base = f"/proc/{pid}"
        try:
            live.add(os.stat(f"{base}/ns/net").st_ino)
        except OSError:
            pass
        try:
            for tid in os.listdir(f"{base}/task"):
                try:
                    live.add(os.stat(f"{base}/task/{tid}/ns/net").st_ino)
                except OSError:
                    pass
        except OSError:
            pass
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("net:["):
                live.add(int(target[5:-1]))
    for mi in ("/proc/self/mountinfo", "/proc/1/mountinfo"):
        try:
            with open(mi) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) > 3 and parts[3].startswith("net:["):
                        live.add(int(parts[3][5:-1]))
        except OSError:
            pass
    return live


def _remove_pins(d: str) -> None:
    """Unpin everything in one namespace's pin directory (links first: that
    unhooks the programs and lets the namespace go), then the directory. The
    loader keeps the one list of its pin names. Raises OSError, as the
    callers expect of a directory that cannot be emptied."""
    try:
        ll.remove_index_pins(d)
    except ConntrackError as exc:
        raise OSError(exc.errno or errno.EIO, f"cannot remove the index pins in {d}: {exc}") \
            from None


def gc() -> List[str]:
    """Remove the index of every namespace that no longer exists (pinned links
    would keep its hooks, maps and conntrack table alive forever). Returns
    the pin directories removed."""
    try:
        root = pin_root()
        if not _check_private_dir(root, "pin root"):
            return []
    except PinRootRefused:
        return []
    removed = []
    with _open_lock:
        try:
            names = [n for n in os.listdir(root) if n.startswith("ns-") and n[3:].isdigit()]
        except OSError:
            return []
        if not names:
            return []
        live = _live_netns_inodes()
        for name in names:
            d = os.path.join(root, name)
            if int(name[3:]) in live:
                continue
            try:
                if not _check_private_dir(d, "pin directory"):
                    continue
                _remove_pins(d)
                removed.append(d)
            except (OSError, PinRootRefused):
                continue
        try:
            os.rmdir(root)
        except OSError:
            pass
    return removed


def detach_pin_dir(d: str) -> None:
    """Detach an index by its pin directory (its namespace's name is gone)."""
    root = pin_root()
    d = os.path.normpath(d)
    if os.path.dirname(d) != root or not os.path.basename(d).startswith("ns-"):
        raise ConntrackError(f"{d} is not an index pin directory under {root}", errno.EINVAL,
                             "detach")
    _check_private_dir(root, "pin root")
    if not _check_private_dir(d, "pin directory"):
        raise ConntrackError(f"no index pinned at {d}", errno.ENOENT, "detach")
    with _open_lock:
        _remove_pins(d)
        try:
            os.rmdir(root)
        except OSError:
            pass


@dataclasses.dataclass
class AttachResult:
    pin_dir: str
    seeded: int
    lost: int
    already_attached: bool
    how: str = ""   # "table" (read in BPF), "dump" (ctnetlink), "" (already attached)


class ZoneIndex:
    """The index of one network namespace (open an attached one, or attach)."""

    def __init__(self, netns_path: Optional[str], netns_label: Optional[str],
                 max_records: int = 0, zoned_kfuncs: Optional[bool] = None,
                 create: bool = False, known: Optional[tuple] = None,
                 preallocate: bool = False) -> None:
        # known: availability() as the capability probe found it (saves a program load)
        ok, zoned, reason = known if known is not None else availability()
        if not ok:
            cls = PermissionDenied if refused_for_privileges(reason) else KernelUnsupported
            raise cls(f"eBPF zone index unavailable: {reason}", errno.EPERM, "index")
        self.zoned_kfuncs_probed = zoned
        self.zoned_kfuncs = zoned if zoned_kfuncs is None else zoned and zoned_kfuncs
        self.netns_path = netns_path
        self.netns_label = netns_label
        self._lock = threading.Lock()
        with _open_lock:
            root = pin_root(mount=create)
            if create:
                _make_private_dir(root, "pin root")
            elif not _check_private_dir(root, "pin root"):
                raise ConntrackError("no eBPF zone index attached", errno.ENOENT, "index")
            self.dir = pin_dir(netns_path, root)
            try:
                self._open(max_records, create, preallocate)
            except ConntrackError as exc:
                if exc.errno != errno.EPROTO:
                    raise
                if not create:
                    raise ConntrackError(OTHER_VERSION, errno.EPROTO, "index") from None
                # attach replaces an index this version cannot use: as if none were there
                self._remove_dir()
                self._open(max_records, create, preallocate)
        self._set_netns(attach=False)

    def _open(self, max_records: int, create: bool, preallocate: bool) -> None:
        """Open the pinned index, or (create) make it: the default size and
        the preallocation's memory check for a new one. EPROTO: pins of a
        version with another record layout."""
        existed = _check_private_dir(self.dir, "pin directory")
        if not existed and not create:
            raise ConntrackError("no eBPF zone index attached", errno.ENOENT, "index")
        if create and not existed and not max_records:
            max_records = default_max_records()
        if create and not existed and preallocate:
            need, avail = preallocation_bytes(max_records), _mem_available()
            if avail is not None and need > avail // 2:
                raise ConntrackError(
                    f"--preallocate would take {need / 2**20:.1f} MiB for {max_records} "
                    f"records up front, more than half of the {avail / 2**20:.1f} MiB "
                    "available; attach without it (memory then follows the records) or "
                    "with a smaller --max-records", errno.ENOMEM, "attach")
        try:
            self._ix = ll.IndexHandle(self.dir, max_records, preallocate and create)
        except ConntrackError as exc:
            if not existed:
                self._remove_dir()
            if exc.errno == errno.ERANGE:
                raise ConntrackError(OTHER_LAYOUT, errno.ERANGE, "attach") from None
            raise

    def _remove_dir(self) -> None:
        try:
            _remove_pins(self.dir)
        except OSError:
            pass

    def _netns_fd(self) -> int:
        return os.open(self.netns_path or "/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _set_netns(self, attach: bool) -> None:
        fd = self._netns_fd()
        try:
            if attach:
                self._ix.attach(fd)
                self._ix.set_meta(netns_cookie=ll.netns_cookie(fd),
                                  attached_ns=os.fstat(fd).st_ino, version=ll.META_VERSION)
            else:
                self._ix.set_netns(fd)
        finally:
            os.close(fd)

    def stale(self) -> bool:
        """The pins belong to another namespace that had the same inode (it
        is gone; inode numbers are reused): never use them."""
        cookie = self._ix.meta()["netns_cookie"]
        if not cookie:
            return False
        fd = self._netns_fd()
        try:
            return ll.netns_cookie(fd) != cookie
        finally:
            os.close(fd)

    def close(self) -> None:
        self._ix.close()

    # -- attach / detach -------------------------------------------------------
    def attach(self, handle: "ll.Handle", kflags: int) -> AttachResult:
        """Attach the hooks, then walk once so entries that already exist are
        recorded too (records are idempotent: duplicates are harmless)."""
        if all(os.path.exists(os.path.join(self.dir, n)) for n in LINK_PINS):
            return AttachResult(self.dir, 0, 0, True)
        try:
            self._set_netns(attach=True)
            # the statistic first: an insert during the walk moves it again
            base = ll.index_blind_spots(handle, self.netns_path)["insert"]
            seeded, lost, how = self._record_existing(handle, kflags)
            self._ix.set_meta(insert_base=base)
        except BaseException:
            self.detach()  # a failed attach leaves no links, maps or directories
            raise
        return AttachResult(self.dir, seeded, lost, False, how)

    def _record_existing(self, handle: "ll.Handle", kflags: int) -> tuple:
        """Record the entries that exist now: read conntrack's table in BPF
        (no entry formatted or copied), or, where that cannot run, a dump.
        Returns (records, lost, how). The table is found from one entry
        looked up by tuple and zone: kernels without zoned kfuncs (6.4-6.10)
        dump."""
        try:
            if self.zoned_kfuncs:
                w = ll.index_walk(handle, self._ix, self.netns_path, WALK_THREADS)
                return w["recorded"], w["lost"], "table"
        except ConntrackError as exc:
            if exc.errno not in WALK_UNAVAILABLE:
                raise
        seeded, lost = ll.index_seed(handle, self._ix, Filter(), kflags)
        return seeded, lost, "dump"

    def detach(self) -> None:
        """Remove the links, the maps and the pin directories: nothing is left
        (the shared root stays while other namespaces have an index)."""
        self._ix.detach()
        self._ix.unpin()
        try:
            os.rmdir(os.path.dirname(self.dir))
        except OSError:
            pass  # not empty: another namespace's index lives there

    # -- reading ---------------------------------------------------------------
    def zone(self, zone: int) -> dict:
        z = self._ix.zone_stats(zone)
        z["window"] = z["head"] - z["tail"]
        z["records"] = z["added"] - z["removed"]
        return z

    def max_records(self) -> int:
        return self._ix.max_records()

    def preallocated(self) -> bool:
        return self._ix.preallocated()

    def dirty(self, zone: int) -> int:
        """Records lost in this zone since its last resync (0: complete)."""
        return self._ix.zone_stats(zone)["failed"]

    def live_records(self) -> int:
        st = self._ix.stats()
        return st["recorded"] + st["seeded"] - st["removed"]

    def blind_spot(self, handle: "ll.Handle", seen: Optional[dict] = None) -> str:
        """Why the index cannot vouch for any zone right now ('' if it can):
        creators the hooks do not see may have made entries. No walk: a few
        netlink messages and map reads. The table count it read last, if it
        read one, goes into ``seen["table_count"]`` (a delete plans with it
        too: one netlink round trip fewer)."""
        spots = ll.index_blind_spots(handle, self.netns_path)
        if spots["ovs_datapaths"] > 0:
            return ("an Open vSwitch kernel datapath in this namespace creates entries "
                    "without netfilter hooks")
        if spots["ovs_datapaths"] < 0:
            return "could not check for Open vSwitch datapaths in this namespace"
        if spots["bridge_tables"] and os.path.exists("/sys/module/nf_conntrack_bridge"):
            return "nftables bridge tables with bridge conntrack bypass the netfilter hooks"
        if os.path.exists("/sys/module/act_ct"):
            return "tc act_ct is loaded: its conntrack bypasses the netfilter hooks"
        moved = spots["insert"] - self._ix.meta()["insert_base"]
        if moved:
            return (f"{moved} entries were inserted through ctnetlink or BPF since the index "
                    "was synchronised")
        # an entry conntrack has just allocated is counted before the hook
        # (right behind conntrack) records it: under traffic a few are always
        # in flight. Unknown entries stay; in-flight ones do not: fall back only
        # if the excess persists over a few reads. Entries that expired and
        # wait for conntrack's gc are still counted though their records were
        # pruned (no lookup or dump sees them any more): allowed for.
        excess = 0
        for attempt in range(5):
            count, live = ll.table_count(handle), self.live_records()
            if seen is not None:
                seen["table_count"] = count
            expired = self._ix.expired_recent() if count > live else 0
            excess = count - live - expired
            if excess <= 0:
                return ""
            if attempt < 4:
                time.sleep(0.0005 * (attempt + 1))
        return (f"the namespace holds {count} entries, the index only {live} records"
                + (f" (and {expired} expired entries awaiting conntrack's gc)" if expired else ""))

    def resync_all(self, handle: "ll.Handle") -> int:
        """One walk: record every live entry the index lacks, then take the
        insert statistic as the new baseline. Returns records lost."""
        with self._lock:
            base = ll.index_blind_spots(handle, self.netns_path)["insert"]
            _, _, _, lost = ll.index_audit(handle, self._ix, 0, add=True)
            self._ix.set_meta(insert_base=base)
            return lost

    def status(self) -> dict:
        zones: Dict[int, dict] = {}
        chunks = 0   # the chunks the zones' windows span: at most this many exist
        for z in range(MAX_ZONES):
            st = self._ix.zone_stats(z)
            if st["head"] != st["tail"] or st["failed"]:
                zones[z] = {"records": st["added"] - st["removed"], "dirty": st["failed"]}
            if st["head"] > st["tail"]:
                chunks += (st["head"] - 1) // CHUNK_SLOTS - st["tail"] // CHUNK_SLOTS + 1
        records = self.live_records()
        max_records = self._ix.max_records()
        preallocated = self._ix.preallocated()
        if preallocated:
            memory = memory_max = preallocation_bytes(max_records) + ZONE_TABLE_BYTES
        else:
            fixed = _bucket_bytes(max_records) + ZONE_TABLE_BYTES
            memory = min(chunks, chunks_for(max_records)) * BYTES_PER_CHUNK + fixed
            memory_max = chunks_for(max_records) * BYTES_PER_CHUNK + fixed
        # the tuples of walks' records: as many chunks as the hook counts
        hook_stats = self._ix.stats()
        tuple_chunks_max = TUPLE_CHUNKS_PER_CHUNK * chunks_for(max_records)
        memory += min(hook_stats["tuple_chunks"], tuple_chunks_max) * BYTES_PER_TUPLE_CHUNK
        memory_max += tuple_chunks_max * BYTES_PER_TUPLE_CHUNK
        return {
            "attached": all(os.path.exists(os.path.join(self.dir, n)) for n in LINK_PINS),
            "pin_dir": self.dir,
            "zoned_kfuncs": self.zoned_kfuncs,
            "zones": zones,
            "dirty_zones": sorted(z for z, v in zones.items() if v["dirty"]),
            "records": records,
            "max_records": max_records,
            "preallocated": preallocated,
            "memory_bytes": memory,
            "memory_max_bytes": memory_max,
            "bytes_per_record": round((BYTES_PER_PREALLOCATED_CHUNK if preallocated
                                       else BYTES_PER_CHUNK) / CHUNK_SLOTS),
            "hook_stats": hook_stats,
        }

    def audit(self, handle: "ll.Handle", max_missing: int = 1000) -> dict:
        missing, checked, sample, _ = ll.index_audit(handle, self._ix, max_missing)
        return {"checked": checked, "missing": missing, "entries": sample}

    # -- deleting --------------------------------------------------------------
    def delete(self, handle: "ll.Handle", f: Filter, use_zone_attr: bool) -> dict:
        with self._lock:  # one reaper per zone at a time
            return ll.index_delete(handle, self._ix, f, self.zoned_kfuncs, use_zone_attr)

    def delete_each(self, handle: "ll.Handle", fs, use_zone_attr: bool) -> tuple:
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
            # record what the index lacks (no duplicates of what it holds)
            _, _, _, lost = ll.index_audit(handle, self._ix, 0, add=True)
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
           "AttachResult", "gc", "detach_pin_dir", "PinRootRefused", "default_max_records"]
