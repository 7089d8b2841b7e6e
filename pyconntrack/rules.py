"""Cleanup requests -> Filters (pure): Neutron-style port dicts (``device``,
``fixed_ips``, ``allowed_address_pairs``), security-group rules (protocol,
port ranges, direction, ethertype, remote CIDR, mark) and remote-IP
cleanups become precise filters (zone + address pair), deduplicated."""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import InvalidFilter
from .filter import Filter, _network
from .types import PROTO_NUMBERS

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Port = Mapping[str, Any]

# Neutron's protocol names beyond the ones Filter knows (neutron-lib IP_PROTOCOL_MAP)
_EXTRA_PROTOCOLS = {
    "ipv6-icmp": 58, "icmpv6": 58, "ah": 51, "esp": 50, "egp": 8, "igmp": 2,
    "ipip": 4, "ipv6-encap": 41, "ipv6-frag": 44, "ipv6-nonxt": 59, "ipv6-opts": 60,
    "ipv6-route": 43, "ospf": 89, "pgm": 113, "rsvp": 46, "vrrp": 112,
}
_ANY_PROTOCOL = {None, "", "any", "ip", "0", 0}
_PORT_PROTOCOLS = {6, 17, 33, 132, 136}  # tcp udp dccp sctp udplite


def _family_of(ethertype: Any) -> int:
    text = str(ethertype).strip().lower() if ethertype is not None else ""
    if text in ("ipv4", "4", "inet"):
        return 4
    if text in ("ipv6", "6", "inet6"):
        return 6
    raise InvalidFilter(f"ethertype must be 'IPv4' or 'IPv6', not {ethertype!r}")


def _net(value: Any, what: str) -> Network:
    if isinstance(value, Mapping):  # {"ip_address": ...} (API port / address pair)
        value = value.get("ip_address")
    elif isinstance(value, (tuple, list)) and value:  # (ip, mac) as in sg_members
        value = value[0]
    # like `conntrack -s 10.0.0.5/24` (and netaddr in Neutron): host bits ignored
    return _network(what, value, strict=False)


def _as_port(device: Any) -> Port:
    if isinstance(device, str):
        return {"device": device}
    if not isinstance(device, Mapping):
        raise InvalidFilter(f"a device is a port dict (or a device name), not {device!r}")
    return device


def _as_ports(devices: Any) -> List[Port]:
    if isinstance(devices, (str, Mapping)):
        devices = [devices]
    return [_as_port(d) for d in devices]


def port_networks(port: Port, family: Optional[int] = None) -> List[Network]:
    """The port's fixed IPs and allowed-address-pair CIDRs (of ``family``),
    deduplicated, in order."""
    out: List[Network] = []
    seen = set()
    name = port.get("device", "?")
    for v in list(port.get("fixed_ips") or []) + list(port.get("allowed_address_pairs") or []):
        net = _net(v, f"port {name} address")
        if (family is None or net.version == family) and net not in seen:
            seen.add(net)
            out.append(net)
    return out


def _protocol(value: Any, family: int) -> Optional[int]:
    if isinstance(value, str):
        value = value.strip().lower()
    if value in _ANY_PROTOCOL:
        return None
    if isinstance(value, str):
        if value.isdigit():
            value = int(value)
        elif value in PROTO_NUMBERS:
            value = PROTO_NUMBERS[value]
        elif value in _EXTRA_PROTOCOLS:
            value = _EXTRA_PROTOCOLS[value]
        else:
            raise InvalidFilter(f"rule protocol {value!r} unknown")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidFilter(f"rule protocol must be a name or 0..255, not {value!r}")
    if value == 0:
        return None
    if value == 1 and family == 6:  # Neutron: "icmp" in an IPv6 rule is ICMPv6
        return 58
    return value


def _port_number(value: Any, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise InvalidFilter(f"rule {what} must be a port 0..65535, not {value!r}")
    return value


def _port_range(rule: Mapping, lo_key: str, hi_key: str) -> Optional[Tuple[int, int]]:
    lo, hi = rule.get(lo_key), rule.get(hi_key)
    if lo is None and hi is None:
        return None
    lo = _port_number(lo if lo is not None else 0, lo_key)
    hi = _port_number(hi, hi_key) if hi is not None else lo
    if lo > hi:
        raise InvalidFilter(f"rule {lo_key} {lo} is above {hi_key} {hi}")
    return (lo, hi)


def _unique(filters: Iterable[Filter]) -> List[Filter]:
    return list(dict.fromkeys(filters))


def rule_filters(zone: int, nets: Sequence[Network], rule: Mapping) -> List[Filter]:
    """Filters for one security-group rule on one zone's device addresses.

    ``ingress``: the device address is the original destination (remote =
    source); ``egress``: the device address is the source. ``protocol``
    (name, number, ``0``/``ip``/``any`` = every protocol),
    ``port_range_min``/``_max`` (destination ports; ICMP type/code are not
    matched, so an ICMP rule covers every ICMP entry of the address),
    ``source_port_range_min``/``_max``, ``remote_ip_prefix`` (CIDR), ``mark``.
    """
    family = _family_of(rule.get("ethertype"))
    direction = str(rule.get("direction", "")).lower()
    if direction not in ("ingress", "egress"):
        raise InvalidFilter(f"rule direction must be 'ingress' or 'egress', "
                            f"not {rule.get('direction')!r}")
    proto = _protocol(rule.get("protocol"), family)
    if (proto == 58 and family == 4) or (proto == 1 and family == 6):
        raise InvalidFilter(f"rule protocol {rule.get('protocol')!r} does not exist in "
                            f"{rule.get('ethertype')}")
    dport = sport = None  # for ICMP the "ports" are type/code, not matched
    if proto is None or proto in _PORT_PROTOCOLS:
        dport = _port_range(rule, "port_range_min", "port_range_max")
        sport = _port_range(rule, "source_port_range_min", "source_port_range_max")
    remote = rule.get("remote_ip_prefix")
    rnet = _net(remote, "rule remote_ip_prefix") if remote not in (None, "") else None
    if rnet is not None and rnet.version != family:
        raise InvalidFilter(f"rule remote_ip_prefix {remote} is not {rule.get('ethertype')}")
    if rnet is not None and rnet.prefixlen == 0:
        rnet = None
    mark = rule.get("mark")
    out = []
    for net in nets:
        if net.version != family:
            continue
        if direction == "ingress":
            src, dst = rnet, net
        else:
            src, dst = net, rnet
        out.append(Filter(zone=zone, family=family, proto=proto, src=src, dst=dst,
                          sport=sport, dport=dport, mark=mark))
    return _unique(out)


def remote_ip_filters(zone: int, nets: Sequence[Network], family: int,
                      remote_ips: Iterable[Any], mark: Any = None) -> List[Filter]:
    """Both directions between each device address and each remote IP/CIDR
    of ``family`` (others are skipped); with no remote IPs, every entry of
    the device addresses (as source or destination)."""
    remotes = _unique(n for n in (_net(r, "remote IP") for r in remote_ips or ())
                      if n.version == family)
    out = []
    for net in nets:
        if net.version != family:
            continue
        if not remote_ips:
            out.append(Filter(zone=zone, family=family, addr=net, mark=mark))
            continue
        for r in remotes:
            out.append(Filter(zone=zone, family=family, src=r, dst=net, mark=mark))  # ingress
            out.append(Filter(zone=zone, family=family, src=net, dst=r, mark=mark))  # egress
    return _unique(out)


__all__ = ["Network", "Port", "port_networks", "remote_ip_filters", "rule_filters"]
