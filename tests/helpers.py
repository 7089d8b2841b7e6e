"""Building known tables in a scratch netns."""
from __future__ import annotations

import contextlib
import errno
import os
import re

from pyconntrack import Conntrack, ConntrackError, Filter

from model import key

# (zone, family, proto, src, dst, sport, dport, mark, reply_src)
BASE_TABLE = [
    (0, "ipv4", "tcp", "10.0.0.1", "192.0.2.1", 1000, 80, 0, None),
    (0, "ipv6", "udp", "fd00::1", "2001:db8::1", 1000, 53, 0, None),
    (1, "ipv4", "tcp", "10.0.0.2", "192.0.2.2", 2000, 443, 1, None),
    (1, "ipv4", "udp", "10.0.1.2", "192.0.2.2", 2000, 53, 2, None),
    (1, "ipv4", "icmp", "10.0.0.3", "192.0.2.3", 3000, 0, 0, None),
    (1, "ipv6", "tcp", "fd00::2", "2001:db8::2", 4000, 22, 1, None),
    (1, "ipv6", "icmpv6", "fd00::3", "2001:db8::3", 5000, 0, 0, None),
    (1, "ipv4", "sctp", "10.0.0.4", "192.0.2.4", 6000, 3868, 0, None),
    (1, "ipv4", "gre", "10.0.0.5", "192.0.2.5", 7000, 7001, 0, None),
    (1, "ipv4", "udplite", "10.0.0.6", "192.0.2.6", 8000, 5000, 0, None),
    (1, "ipv4", "dccp", "10.0.0.7", "192.0.2.7", 9000, 5001, 0, None),
    (1, "ipv4", "tcp", "10.0.0.8", "198.51.100.1", 1100, 80, 0, "172.16.0.5"),  # DNAT'd
    (1, "ipv6", "udp", "fd00::8", "2001:db8::80", 1100, 53, 0, "fd01::5"),     # DNAT'd
    (2, "ipv4", "tcp", "10.0.0.1", "192.0.2.1", 1000, 80, 0, None),  # same tuple, zone 2
    (65535, "ipv4", "udp", "10.9.9.9", "192.0.2.9", 1200, 123, 0xFF00, None),
    (65535, "ipv6", "tcp", "fd00::9", "2001:db8::9", 1200, 443, 0xFF01, None),
]


def populate(ct: Conntrack, rows=BASE_TABLE, count: int = 3) -> None:
    for zone, family, proto, src, dst, sport, dport, mark, reply_src in rows:
        # DCCP is a portless generic protocol on kernels without DCCP conntrack
        # (removed in 6.16): only one entry per address pair can exist there
        n = 1 if proto == "dccp" else count
        ct.create_many(n, zone=zone, family=family, proto=proto, src=src, dst=dst,
                       sport=sport, dport=dport, mark=mark, reply_src=reply_src)


def table(ct: Conntrack) -> dict:
    """Every entry of the namespace by identity."""
    return {key(e): e for e in ct.dump()}


def refill(ct: Conntrack, rows) -> None:
    """Empty the scratch table, then create each drawn row (``count`` entries
    of it). The same tuple drawn twice is refused (EEXIST): the table is what
    the kernel then holds."""
    ct.delete(Filter(), strategy="walk", allow_default_zone=True)
    for r in rows:
        r = dict(r)
        n = r.pop("count")
        try:
            ct.create_many(n, **r)
        except ConntrackError as exc:
            assert exc.errno == errno.EEXIST


@contextlib.contextmanager
def index_host(netns: str):
    """A Conntrack on ``netns`` whose eBPF index is always detached at the
    end: pinned links outlive their namespace."""
    ct = Conntrack(netns)
    try:
        yield ct
    finally:
        ct.detach_index()
        ct.close()


def require_index():
    """The zoned-kfunc flag where the eBPF index loads; a skip saying why on
    kernels before 6.4 (no netfilter BPF: a finding, not a silent skip); a
    failure on newer kernels, where it must work."""
    import pytest
    from pyconntrack import index as index_mod
    ok, zoned, reason = index_mod.availability()
    if ok:
        return zoned
    if kernel_version() < (6, 4):
        assert "6.4" in reason
        pytest.skip(f"kernel {os.uname().release}: {reason}")
    pytest.fail(f"the eBPF zone index should work on {os.uname().release}: {reason}")


def kernel_version() -> tuple:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return int(m.group(1)), int(m.group(2))
