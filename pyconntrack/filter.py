"""Filter: an immutable, validated description of which entries to touch."""
from __future__ import annotations

import ipaddress
from typing import Any, Optional, Tuple, Union

from .errors import InvalidFilter
from .types import PROTO_NUMBERS

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
PortRange = Tuple[int, int]

FAMILIES = {"ipv4": 4, "ipv6": 6, "inet": 4, "inet6": 6, 4: 4, 6: 6}
_ADDRESS_FIELDS = ("src", "dst", "addr", "reply_src", "reply_dst")
U32 = 0xFFFFFFFF


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _zone(value: Any) -> int:
    if not _is_int(value):
        raise InvalidFilter(f"zone must be an integer 0..65535, not {type(value).__name__} {value!r}")
    if not 0 <= value <= 0xFFFF:
        raise InvalidFilter(f"zone {value} out of range 0..65535")
    return value


def _family(value: Any) -> int:
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, bool) or not isinstance(key, (str, int)) or key not in FAMILIES:
        raise InvalidFilter(f"family must be 'ipv4' or 'ipv6', not {value!r}")
    return FAMILIES[key]


def _proto(value: Any) -> int:
    if isinstance(value, str):
        name = value.lower()
        if name.isascii() and name.isdigit():
            value = int(name) if len(name) <= 3 else 256  # out of range either way
        elif name in PROTO_NUMBERS:
            return PROTO_NUMBERS[name]
        else:
            raise InvalidFilter(
                f"unknown protocol {value!r} (known: {', '.join(sorted(PROTO_NUMBERS))} or 0..255)")
    if not _is_int(value) or not 0 <= value <= 255:
        raise InvalidFilter(f"protocol must be a name or a number 0..255, not {value!r}")
    return value


def _network(name: str, value: Any, strict: bool = True) -> Network:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if not isinstance(value, str):
        raise InvalidFilter(f"{name} must be an IP address or CIDR string, not {value!r}")
    try:
        # strict: 10.0.0.1/8 is almost always a typo for 10.0.0.0/8 or 10.0.0.1
        return ipaddress.ip_network(value.strip(), strict=strict)
    except ValueError as exc:
        raise InvalidFilter(f"{name}: invalid IP address or CIDR {value!r}: {exc}") from None


def _port(name: str, value: Any) -> PortRange:
    if isinstance(value, str):
        text = value.strip()
        lo_text, sep, hi_text = text.partition("-")
        try:
            lo = int(lo_text, 10)
            hi = int(hi_text, 10) if sep else lo
        except ValueError:
            raise InvalidFilter(f"{name}: invalid port or range {value!r} (use P or P-Q)") from None
        value = (lo, hi)
    if _is_int(value):
        value = (value, value)
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(_is_int(v) for v in value)):
        raise InvalidFilter(f"{name} must be a port, 'P-Q' or a (lo, hi) tuple, not {value!r}")
    lo, hi = value
    if not (0 <= lo <= 65535 and 0 <= hi <= 65535):
        raise InvalidFilter(f"{name} {value!r}: ports are 0..65535")
    if lo > hi:
        raise InvalidFilter(f"{name} {value!r}: range start is above its end")
    return (lo, hi)


ZONE_DIRS = ("both", "orig", "reply")


def _zone_dir(value: Any) -> str:
    key = value.lower() if isinstance(value, str) else value
    aliases = {"original": "orig", "repl": "reply"}
    key = aliases.get(key, key) if isinstance(key, str) else key
    if key not in ZONE_DIRS:
        raise InvalidFilter(f"zone_dir must be one of {', '.join(ZONE_DIRS)}, not {value!r}")
    return key


def _mark(value: Any) -> Tuple[int, int]:
    if isinstance(value, str):
        text, sep, mask_text = value.strip().partition("/")
        if sep and not mask_text.strip():
            raise InvalidFilter(f"mark: {value!r} has an empty mask (use V or V/MASK)")
        try:
            value = (int(text, 0), int(mask_text, 0)) if sep else int(text, 0)
        except ValueError:
            raise InvalidFilter(f"mark: invalid value {value!r} (use V or V/MASK)") from None
    if _is_int(value):
        value = (value, U32)
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(_is_int(v) for v in value)):
        raise InvalidFilter(f"mark must be an int or a (value, mask) tuple, not {value!r}")
    mark, mask = value
    if not (0 <= mark <= U32 and 0 <= mask <= U32):
        raise InvalidFilter(f"mark {value!r}: value and mask are 32-bit unsigned")
    if mark & ~mask:
        raise InvalidFilter(f"mark 0x{mark:x} has bits outside mask 0x{mask:x}: it could never match")
    return (mark, mask)


class Filter:
    """Which conntrack entries to list, count or delete.

    Every field is optional and fields are ANDed. ``zone`` matches the
    entry's zone id whatever direction the zone was set for (both, original
    only, reply only: as the kernel's own zone filters do); ``zone_dir``
    (``"both"``, ``"orig"``, ``"reply"``, with a non-zero ``zone``) asks for
    one of those forms only. Addresses take an IP or a CIDR; ``src``/``dst``
    match the original direction, ``addr`` either of them,
    ``reply_src``/``reply_dst`` the reply direction (the NAT side). Ports take
    an int, ``"P-Q"`` or ``(lo, hi)`` (inclusive) and match the original
    direction (for GRE: the keys); entries without ports (ICMP) never match a
    port. ``mark`` takes an int or ``(value, mask)``: ``entry.mark & mask ==
    value``.

    Fields that narrow nothing are normalised away when the filter is built,
    so :meth:`describe`, the planner and the zone-0 guard see what the filter
    really selects: a /0 prefix only selects its family, a mark mask of 0
    selects every entry.

    Raises :class:`InvalidFilter` (a ``ValueError``) on any bad input.
    """

    __slots__ = ("zone", "family", "proto", "src", "dst", "addr", "reply_src",
                 "reply_dst", "sport", "dport", "mark", "zone_dir")

    zone: Optional[int]
    zone_dir: Optional[str]
    family: Optional[int]
    proto: Optional[int]
    src: Optional[Network]
    dst: Optional[Network]
    addr: Optional[Network]
    reply_src: Optional[Network]
    reply_dst: Optional[Network]
    sport: Optional[PortRange]
    dport: Optional[PortRange]
    mark: Optional[Tuple[int, int]]

    def __init__(self, *, zone: Any = None, family: Any = None, proto: Any = None,
                 src: Any = None, dst: Any = None, addr: Any = None,
                 reply_src: Any = None, reply_dst: Any = None,
                 sport: Any = None, dport: Any = None, mark: Any = None,
                 zone_dir: Any = None) -> None:
        values = {
            "zone": None if zone is None else _zone(zone),
            "zone_dir": None if zone_dir is None else _zone_dir(zone_dir),
            "family": None if family is None else _family(family),
            "proto": None if proto is None else _proto(proto),
            "sport": None if sport is None else _port("sport", sport),
            "dport": None if dport is None else _port("dport", dport),
            "mark": None if mark is None else _mark(mark),
        }
        given = {"src": src, "dst": dst, "addr": addr,
                 "reply_src": reply_src, "reply_dst": reply_dst}
        versions = set()
        for name, value in given.items():
            net = None if value is None else _network(name, value)
            values[name] = net
            if net is not None:
                versions.add(net.version)
        if len(versions) > 1:
            raise InvalidFilter("addresses mix IPv4 and IPv6: a connection has one family")
        if versions:
            version = versions.pop()
            if values["family"] is not None and values["family"] != version:
                raise InvalidFilter(f"family ipv{values['family']} does not match IPv{version} addresses")
            values["family"] = version
        p = values["proto"]
        if p is not None and values["family"] is not None:
            if (p == 1 and values["family"] == 6) or (p == 58 and values["family"] == 4):
                raise InvalidFilter(f"protocol {'icmp' if p == 1 else 'icmpv6'} does not exist "
                                    f"in ipv{values['family']}")
        if (values["sport"] or values["dport"]) and p in (1, 58):
            raise InvalidFilter("ICMP entries have no ports: drop --sport/--dport or the protocol")
        if values["zone_dir"] is not None:
            if values["zone"] is None:
                raise InvalidFilter("zone_dir needs a zone")
            if values["zone"] == 0:
                raise InvalidFilter("zone 0 has no direction: the kernel reports no zone for it")
        # normalise what narrows nothing: /0 keeps only its family (set above)
        for name in _ADDRESS_FIELDS:
            if values[name] is not None and values[name].prefixlen == 0:
                values[name] = None
        if values["mark"] is not None and values["mark"][1] == 0:
            values["mark"] = None   # (0, 0): every mark matches
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Filter is immutable; build a new one with replace()")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Filter is immutable")

    def replace(self, **changes: Any) -> "Filter":
        kwargs = self.as_kwargs()
        kwargs.update(changes)
        return Filter(**kwargs)

    def as_kwargs(self) -> dict:
        out: dict = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "family":
                value = f"ipv{value}"
            out[name] = value
        return out

    @property
    def address_fields(self) -> Tuple[str, ...]:
        return tuple(n for n in _ADDRESS_FIELDS if getattr(self, n) is not None)

    def narrows_within_protocol(self) -> bool:
        """True when the filter can exclude some entries of a protocol and
        family it selects: an address prefix, a port range short of the full
        0-65535 (the full range only selects entries that have ports, like a
        protocol does), or a mark (a zero mask is normalised away)."""
        full = (0, 65535)
        return bool(self.address_fields
                    or (self.sport is not None and self.sport != full)
                    or (self.dport is not None and self.dport != full)
                    or self.mark is not None)

    def is_broad_on_default_zone(self) -> bool:
        """True when the filter could match every entry of zone 0 (the host's
        own connections), or of every zone, up to family or protocol: such
        deletes need consent (allow_default_zone / --force)."""
        if self.zone not in (None, 0):
            return False
        return not self.narrows_within_protocol()

    def is_zone_flushable(self) -> bool:
        """Exactly zone [+ family, mark]: what a one-message flush can express
        (the kernel's zone filter ignores the direction: no zone_dir)."""
        if self.zone is None or self.zone_dir is not None:
            return False
        return not (self.address_fields or self.proto is not None
                    or self.sport is not None or self.dport is not None)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Filter):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.as_kwargs().items()]
        return f"Filter({', '.join(parts)})"

    def describe(self) -> str:
        parts = []
        for k, v in self.as_kwargs().items():
            if k in ("sport", "dport"):
                v = str(v[0]) if v[0] == v[1] else f"{v[0]}-{v[1]}"
            elif k == "mark":
                v = f"0x{v[0]:x}/0x{v[1]:x}"
            parts.append(f"{k}={v}")
        return " ".join(parts) or "(everything)"
