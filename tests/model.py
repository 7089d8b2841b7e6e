"""An independent model of filter matching, written from the documented
semantics (not from the C code), for property tests."""
from __future__ import annotations

import ipaddress


def model_match(f, e) -> bool:
    """f: pyconntrack.Filter; e: pyconntrack.Entry."""
    fam = 4 if e.family == "ipv4" else 6
    # zone Z: the entry's zone id, whatever direction it was set for
    if f.zone is not None and e.zone != f.zone:
        return False
    if getattr(f, "zone_dir", None) is not None and e.zone_dir != f.zone_dir:
        return False
    if f.family is not None and fam != f.family:
        return False
    if f.proto is not None and e.proto != f.proto:
        return False
    if f.mark is not None and (e.mark & f.mark[1]) != f.mark[0]:
        return False

    def inside(addr, net) -> bool:
        return addr.version == net.version and addr in net

    if f.src is not None and not inside(e.src, f.src):
        return False
    if f.dst is not None and not inside(e.dst, f.dst):
        return False
    if f.addr is not None and not (inside(e.src, f.addr) or inside(e.dst, f.addr)):
        return False
    if f.reply_src is not None and not inside(e.reply_src, f.reply_src):
        return False
    if f.reply_dst is not None and not inside(e.reply_dst, f.reply_dst):
        return False
    if f.sport is not None and (e.sport is None or not f.sport[0] <= e.sport <= f.sport[1]):
        return False
    if f.dport is not None and (e.dport is None or not f.dport[0] <= e.dport <= f.dport[1]):
        return False
    return True


def key(e) -> tuple:
    """Identity of an entry across dumps."""
    return (e.family, e.proto, e.zone, e.zone_dir, str(e.src), str(e.dst), e.sport, e.dport,
            e.icmp_type, e.icmp_id)


__all__ = ["model_match", "key", "ipaddress"]
