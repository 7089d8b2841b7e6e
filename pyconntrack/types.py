"""Result and value types."""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import NamedTuple, Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre",
               58: "icmpv6", 132: "sctp", 136: "udplite"}
PROTO_NUMBERS = {name: num for num, name in PROTO_NAMES.items()}
TCP_STATES = ["NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
              "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"]


class Entry(NamedTuple):
    """One conntrack entry (original and reply tuples, zone, mark, id).

    ``zone`` is the zone id; ``zone_dir`` says which directions it applies to:
    ``"both"`` (a plain zone, and always for zone 0), ``"orig"`` or
    ``"reply"`` (``-j CT --zone-orig/--zone-reply``, ``conntrack -I
    --orig-zone/--reply-zone``)."""

    family: str
    proto: int
    zone: int
    src: IPAddress
    dst: IPAddress
    sport: Optional[int]
    dport: Optional[int]
    reply_src: IPAddress
    reply_dst: IPAddress
    reply_sport: Optional[int]
    reply_dport: Optional[int]
    icmp_type: Optional[int]
    icmp_code: Optional[int]
    icmp_id: Optional[int]
    mark: int
    status: int
    timeout: int
    tcp_state: Optional[str]
    id: int
    zone_dir: str = "both"

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))

    def to_dict(self) -> dict:
        d = self._asdict()
        for key in ("src", "dst", "reply_src", "reply_dst"):
            d[key] = str(d[key])
        d["proto"] = self.proto_name
        return d


class DeleteResult(NamedTuple):
    """What a delete did. ``errno`` is the first failure's errno (0 if none)."""

    matched: int
    deleted: int
    already_gone: int
    failed: int
    errno: int
    strategy: str
    walks: int
    elapsed_s: float
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def to_dict(self) -> dict:
        return self._asdict()


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the probe proved about this kernel (all False when unprobed)."""

    probed: bool = False
    probe_error: str = ""
    zones: bool = False
    dump_zone: bool = False
    flush_zone: bool = False
    flush_family: bool = False
    flush_mark: bool = False
    dump_mark: bool = False
    dump_filter_v4: bool = False
    dump_filter_v6: bool = False
    dump_filter_v6_inverted: bool = False
    flush_filter: bool = False
    netfilter_bpf: bool = False     # BPF_PROG_TYPE_NETFILTER loadable (6.4+, CAP_BPF)
    zoned_kfuncs: bool = False      # conntrack kfuncs take a zone (6.11+)
    index_error: str = ""           # why the eBPF zone index is unavailable
    kernel: str = ""

    @property
    def send_zone(self) -> bool:
        """Put CTA_ZONE in requests: the kernel has zones, or nobody knows
        (unprobed: a kernel without zones answers EOPNOTSUPP, loudly)."""
        return self.zones or not self.probed

    def restrict(self, other: "Capabilities") -> "Capabilities":
        """Only what both allow: a caller can lower, never raise, capabilities."""
        fields = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            fields[f.name] = (a and b) if isinstance(a, bool) else a
        return Capabilities(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
