"""ConntrackManager: what a hypervisor agent (e.g. Neutron's L2 agent) embeds.

- Zones per device key: ``get_device_zone(port, create=True)``, release, an
  initial map parsed from ``iptables-save -t raw`` (``-j CT --zone N``) or
  from nftables (``ct zone set N``); allocation takes the highest zone in use
  + 1, then the first gap, and raises :class:`ZonesExhausted` only when every
  zone of the range is taken (after freeing the zones of removed devices when
  an ``active_devices`` callable is given).
- Cleanups on Neutron-style port dicts (``device``: the port id, as
  Neutron's agents pass it, or the interface name; ``fixed_ips``,
  ``allowed_address_pairs``, ``network_id``; ``of_port`` with ``zone_of``): :meth:`delete_by_remote_ips`,
  :meth:`delete_by_rule` (protocol, port range, direction, ethertype, remote
  CIDR, mark) and :meth:`delete_by_device`. Each becomes precise filters
  (zone + address pair), deduplicated.
- A queue: every cleanup returns a :class:`CleanupHandle` at once. One worker
  thread takes everything queued and runs it as a single table walk
  (``Conntrack.delete_each``), however many requests and zones, then gives
  each handle its own :class:`DeleteResult` (or the pass's exception, with
  errno). The worker never dies on an error. Handles are awaitable.

Counting: an entry matched by several queued requests is deleted once and
counted once, for the earliest-queued request that asked for it, so the
handles' ``deleted`` add up to what left the table.

    >>> with ConntrackManager(netns="tenant1") as mgr:
    ...     port = {"device": "tap8f46cf18-12", "network_id": "n1",
    ...             "fixed_ips": ["10.0.0.5"]}
    ...     zone = mgr.get_device_zone(port)
    ...     h = mgr.delete_by_remote_ips([port], "IPv4", ["10.0.0.9"])
    ...     h.wait().deleted
"""
from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import ipaddress
import logging
import re
import shlex
import threading
import time
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Union)

from .conntrack import Conntrack
from .errors import ConntrackError, InvalidFilter
from .filter import Filter, _network
from .types import Capabilities, DeleteResult, PROTO_NUMBERS

LOG = logging.getLogger(__name__)

ZONE_START = 4097          # Neutron: above OVS local VLANs 1..4096 (bug 1745642)
MAX_ZONE = 65535
DEV_PREFIX_LEN = 3         # "tap", "qvb", "brq" (neutron-lib LINUX_DEV_PREFIX_LEN)
DEV_KEY_LEN = 11           # LINUX_DEV_LEN 14 - prefix: the UUID fragment in a name

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


class ZonesExhausted(ConntrackError):
    """Every zone of the manager's range is mapped to a device key."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENOSPC, "get_device_zone")


# -- initial zone maps ---------------------------------------------------------------

def _key_from_ifname(name: str, prefix_len: int, key_len: int) -> str:
    return name[prefix_len:][:key_len]


_PORT_ID = re.compile(r"^[0-9a-fA-F]{8}(-|$)")


def port_device_key(device: str, prefix_len: int = DEV_PREFIX_LEN,
                    key_len: int = DEV_KEY_LEN) -> str:
    """The zone-map key of a port's ``device``: a port id (what Neutron's
    OVS-hybrid firewall passes: ``8f46cf18-12ab-...``) gives its first 11
    characters, an interface name (``tap8f46cf18-12``, ``qvb...``) the 11
    after its 3-character prefix. Both give the fragment Neutron writes into
    interface names, so both find a zone loaded from ``iptables-save``. A
    port id starts with 8 hex digits; no interface prefix (``tap``, ``qvb``,
    ``qvo``, ``qbr``, ``brq``) does."""
    if _PORT_ID.match(device):
        return device[:key_len]
    return _key_from_ifname(device, prefix_len, key_len)


def of_port_zone(port: Mapping[str, Any]) -> Optional[int]:
    """Neutron's OVS firewall zone: the port's local VLAN,
    ``port["of_port"].vlan_tag`` (None when the port has no ``of_port``)."""
    of_port = port.get("of_port")
    return None if of_port is None else getattr(of_port, "vlan_tag", None)


_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


def parse_iptables_zones(rules: Union[str, Iterable[str]], prefix_len: int = DEV_PREFIX_LEN,
                         key_len: int = DEV_KEY_LEN) -> Dict[str, int]:
    """Device key -> zone from ``iptables-save -t raw`` output (text or lines).

    Reads rules like ``-A neutron-openvswi-PREROUTING -m physdev --physdev-in
    tap8f46cf18-12 -m comment --comment "Set zone for ..." -j CT --zone 4105``
    (``--zone-orig N`` / ``--zone-reply N`` too: the zone id is the zone).
    The key is the interface name without its prefix (``tap``/``qvb``/``brq``),
    truncated to 11 characters: a port-id fragment for per-port zones, a
    network-id fragment (``brq`` bridges) for per-network zones, as Neutron
    keys them. Negated matches (``! --physdev-in``) and non-numeric zones are
    ignored.
    """
    lines = rules.splitlines() if isinstance(rules, str) else list(rules)
    zones: Dict[str, int] = {}
    for line in lines:
        if "--physdev-in" not in line or "--zone" not in line:
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:  # unbalanced quotes in a comment
            tokens = line.split()
        dev = zone = None
        for i, tok in enumerate(tokens[:-1]):
            nxt = tokens[i + 1]
            if tok == "--physdev-in" and not (i and tokens[i - 1] == "!"):
                dev = nxt
            elif tok == "-j" and nxt == "CT":
                rest = tokens[i + 2:]
                for j, t in enumerate(rest[:-1]):
                    # a zone for both directions or for one (the id is the zone)
                    if t in ("--zone", "--zone-orig", "--zone-reply") and rest[j + 1].isdigit():
                        zone = int(rest[j + 1])
        if dev and zone is not None and zone <= MAX_ZONE and _IFNAME.match(dev):
            zones[_key_from_ifname(dev, prefix_len, key_len)] = zone
    return zones


_NFT_IIFNAME = re.compile(r'\biifname\s+(?:"([^"]+)"|([^\s{},"]+))')
_NFT_ZONE = re.compile(r"\bct\s+(?:(?:original|reply)\s+)?zone\s+set\s+(\d+)\b")


def parse_nft_zones(ruleset: Union[str, Iterable[str]], prefix_len: int = DEV_PREFIX_LEN,
                    key_len: int = DEV_KEY_LEN) -> Dict[str, int]:
    """Device key -> zone from ``nft list ruleset`` output: rules like
    ``iifname "tap8f46cf18-12" ct zone set 4105`` (``meta iifname`` too;
    ``ct original zone set`` / ``ct reply zone set`` as well).
    Wildcards and sets of names are ignored."""
    lines = ruleset.splitlines() if isinstance(ruleset, str) else list(ruleset)
    zones: Dict[str, int] = {}
    for line in lines:
        zm = _NFT_ZONE.search(line)
        im = _NFT_IIFNAME.search(line)
        if not zm or not im:
            continue
        name = im.group(1) or im.group(2)
        zone = int(zm.group(1))
        if "*" in name or not _IFNAME.match(name) or zone > MAX_ZONE:
            continue
        zones[_key_from_ifname(name, prefix_len, key_len)] = zone
    return zones


# -- port dicts -> filters (pure) -----------------------------------------------------

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


# -- handles ---------------------------------------------------------------------------

class CleanupHandle:
    """A queued cleanup. ``wait()`` returns its DeleteResult or raises the
    error of the pass that ran it (a ConntrackError with ``errno``);
    ``await handle`` does the same without blocking an event loop."""

    def __init__(self, description: str, filters: Sequence[Filter]) -> None:
        self.description = description
        self.filters: Tuple[Filter, ...] = tuple(filters)
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._result: Optional[DeleteResult] = None
        self._exc: Optional[BaseException] = None
        self._callbacks: List[Callable[["CleanupHandle"], None]] = []
        self._on_complete: List[Callable[[], None]] = []  # manager bookkeeping, before waiters

    def __repr__(self) -> str:
        state = ("pending" if not self.done() else
                 f"failed: {self._exc}" if self._exc else f"deleted {self._result.deleted}")
        return f"<CleanupHandle {self.description} ({len(self.filters)} filters) {state}>"

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> DeleteResult:
        """The DeleteResult; raises the pass's exception, or TimeoutError."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"cleanup not done after {timeout} s: {self.description}")
        if self._exc is not None:
            raise self._exc
        assert self._result is not None
        return self._result

    result = wait

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if not self._event.wait(timeout):
            raise TimeoutError(f"cleanup not done after {timeout} s: {self.description}")
        return self._exc

    def add_done_callback(self, fn: Callable[["CleanupHandle"], None]) -> None:
        """Call ``fn(handle)`` when done (at once if it already is); it runs in
        the worker thread, so it must be quick. Its exceptions are logged."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _call(self, fn: Callable[["CleanupHandle"], None]) -> None:
        try:
            fn(self)
        except Exception:  # a caller's callback must not kill the worker
            LOG.exception("conntrack cleanup done-callback failed: %s", self.description)

    def _finish(self, result: Optional[DeleteResult], exc: Optional[BaseException]) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._result, self._exc = result, exc
            hooks, self._on_complete = self._on_complete, []
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    LOG.exception("conntrack manager bookkeeping failed")
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._call(fn)

    def wait_async(self) -> "asyncio.Future[DeleteResult]":
        """An asyncio future for the running loop (bridged thread-safely)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def settle(h: "CleanupHandle") -> None:
            if fut.cancelled():
                return
            if h._exc is not None:
                fut.set_exception(h._exc)
            else:
                fut.set_result(h._result)

        def on_done(h: "CleanupHandle") -> None:
            try:
                loop.call_soon_threadsafe(settle, h)
            except RuntimeError:  # the loop was closed meanwhile
                pass

        self.add_done_callback(on_done)
        return fut

    def __await__(self):
        return self.wait_async().__await__()


class _Request:
    __slots__ = ("handle", "release_keys")

    def __init__(self, handle: CleanupHandle, release_keys: Sequence[Tuple[str, int]] = ()):
        self.handle = handle
        self.release_keys = tuple(release_keys)


def _empty_result(reason: str) -> DeleteResult:
    return DeleteResult(0, 0, 0, 0, 0, "none", 0, 0.0, reason)


def _as_error(exc: BaseException) -> ConntrackError:
    if isinstance(exc, ConntrackError):
        return exc
    err = ConntrackError(f"conntrack cleanup pass failed: {exc!r}",
                         getattr(exc, "errno", None), "ConntrackManager pass")
    err.__cause__ = exc
    return err


# -- the manager -----------------------------------------------------------------------

class ConntrackManager:
    """Zones per device and queued, coalesced conntrack cleanups for one
    network namespace.

    ``netns``: None (this namespace), a name under /var/run/netns or a path.
    ``zone_range``: ``(first, last)`` zones to allocate (default 4097..65535;
    zone 0, the host's, is never allocated). ``zone_per_port``: key zones by
    port (see :func:`port_device_key`: ``device`` a port id or an interface
    name, 11 characters) or, if False, by ``network_id`` (11 characters), as
    Neutron does; or pass ``device_key(port) -> str``. ``zone_of``: the
    zone comes from the port itself, not from the map (e.g.
    :func:`of_port_zone` for Neutron's OVS firewall, whose zone is the
    port's local VLAN); such zones are never allocated, and 0 means none.
    ``initial_zones``: a ``{key: zone}`` map, e.g.
    from :func:`parse_iptables_zones` / :func:`parse_nft_zones`.
    ``active_devices``: optional callable returning the ports that still
    exist; when the range is full, the zones of other keys are freed and
    allocation retried once. ``conntrack``: an existing object with
    ``delete_each`` to use instead of opening one (not closed by us);
    ``capabilities`` lowers what the kernel probe allows.
    ``max_filters_per_pass``: a pass never splits a request, but starts a new
    walk past this many filters (the walk matches each entry against every
    filter).

    Thread-safe. Cleanup methods validate their input at once (InvalidFilter)
    and return a :class:`CleanupHandle`; zones are looked up at call time
    (never created by a cleanup) and devices without a zone are skipped.
    """

    def __init__(self, netns: Optional[str] = None,
                 zone_range: Tuple[int, int] = (ZONE_START, MAX_ZONE), *,
                 zone_per_port: bool = True,
                 device_key: Optional[Callable[[Port], str]] = None,
                 zone_of: Optional[Callable[[Port], Optional[int]]] = None,
                 initial_zones: Optional[Mapping[str, int]] = None,
                 active_devices: Optional[Callable[[], Iterable[Any]]] = None,
                 conntrack: Any = None,
                 capabilities: Optional[Capabilities] = None,
                 max_filters_per_pass: int = 4096) -> None:
        lo, hi = self._check_range(zone_range)
        self.zone_range = (lo, hi)
        self.zone_per_port = zone_per_port
        self._device_key_fn = device_key
        self._zone_of = zone_of
        self._active_devices = active_devices
        if (isinstance(max_filters_per_pass, bool) or not isinstance(max_filters_per_pass, int)
                or max_filters_per_pass < 1):
            raise InvalidFilter(f"max_filters_per_pass must be a positive int, "
                                f"not {max_filters_per_pass!r}")
        self.max_filters_per_pass = max_filters_per_pass
        self._zlock = threading.RLock()
        self._zones: Dict[str, int] = {}
        if initial_zones:
            self.load_zones(initial_zones)
        self._own_ct = conntrack is None
        self._ct = Conntrack(netns, capabilities=capabilities) if conntrack is None else conntrack
        self.netns = netns
        # queue state
        self._cond = threading.Condition()
        self._queue: List[_Request] = []
        self._pending: Dict[int, CleanupHandle] = {}
        self._holds = 0
        self._closing = False
        self._closed = False
        self.walks = 0              # table walks done by the worker
        self.passes = 0             # delete_each calls (successful or not)
        self.failed_passes = 0
        self.requests_done = 0
        self._thread = threading.Thread(target=self._worker, name="pyconntrack-manager",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _check_range(zone_range: Any) -> Tuple[int, int]:
        try:
            lo, hi = zone_range
        except (TypeError, ValueError):
            raise InvalidFilter(f"zone_range must be (first, last), not {zone_range!r}") from None
        for z in (lo, hi):
            if isinstance(z, bool) or not isinstance(z, int):
                raise InvalidFilter(f"zone_range bounds must be ints, not {z!r}")
        if not 1 <= lo <= hi <= MAX_ZONE:
            raise InvalidFilter(f"zone_range {zone_range!r} must satisfy 1 <= first <= last "
                                f"<= 65535 (zone 0 is the host's)")
        return lo, hi

    # -- lifetime --------------------------------------------------------------------
    def __enter__(self) -> "ConntrackManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop taking requests, run what is queued, stop the worker (and close
        the Conntrack it opened). Returns False if the worker was still busy
        after ``timeout`` seconds. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        with self._cond:
            if self._closed:
                return True
            self._closed = True
        if self._own_ct:
            self._ct.close()
        return True

    @property
    def conntrack(self) -> Any:
        """The Conntrack used by the worker (e.g. for dump/count)."""
        return self._ct

    # -- zones -----------------------------------------------------------------------
    def device_key(self, device: Any) -> str:
        port = _as_port(device)
        if self._device_key_fn is not None:
            key = self._device_key_fn(port)
        elif self.zone_per_port:
            name = port.get("device")
            if not isinstance(name, str) or not name:
                raise InvalidFilter(f"port has no device name: {port!r}")
            key = port_device_key(name)
        else:
            net = port.get("network_id")
            if not isinstance(net, str) or not net:
                raise InvalidFilter(f"per-network zones need the port's network_id: {port!r}")
            key = net[:DEV_KEY_LEN]
        if not isinstance(key, str) or not key:
            raise InvalidFilter(f"empty device key for {port!r}")
        return key

    def get_device_zone(self, device: Any, create: bool = True) -> Optional[int]:
        """The device's zone; allocated if ``create`` (else None when unmapped).
        Raises ZonesExhausted when every zone of the range is in use."""
        if self._zone_of is not None:
            return self._port_zone(_as_port(device))
        key = self.device_key(device)
        with self._zlock:
            zone = self._zones.get(key)
            if zone is not None or not create:
                return zone
            try:
                zone = self._find_open_zone()
            except ZonesExhausted:
                if self._active_devices is None:
                    raise
                freed = self.free_unused_zones(self._active_devices())
                LOG.info("conntrack zones exhausted: freed %d zones of removed devices", len(freed))
                zone = self._find_open_zone()
            self._zones[key] = zone
            LOG.debug("assigned conntrack zone %d to device key %s", zone, key)
            return zone

    def _port_zone(self, port: Port) -> Optional[int]:
        zone = self._zone_of(port)
        if zone is None:
            return None
        if isinstance(zone, bool) or not isinstance(zone, int) or not 0 <= zone <= MAX_ZONE:
            raise InvalidFilter(f"zone of port {port.get('device', '?')} must be 0..65535, "
                                f"not {zone!r}")
        return zone or None  # 0: the host's zone is never a port's

    def _find_open_zone(self) -> int:
        lo, hi = self.zone_range
        used = sorted({z for z in self._zones.values() if lo <= z <= hi})
        if not used:
            return lo
        if used[-1] < hi:
            return used[-1] + 1
        for index, zone in enumerate(used):
            if zone != lo + index:
                return lo + index
        raise ZonesExhausted(f"all {hi - lo + 1} conntrack zones {lo}..{hi} are in use "
                             f"({len(self._zones)} device keys mapped)")

    def release_device_zone(self, device: Any) -> Optional[int]:
        """Forget the device's zone (returned, or None if it had none). Queue
        its cleanup first, or use ``delete_by_device(..., release_zones=True)``."""
        key = self.device_key(device)
        with self._zlock:
            return self._zones.pop(key, None)

    def free_unused_zones(self, active_devices: Iterable[Any]) -> Dict[str, int]:
        """Drop the zones of every key not among ``active_devices``; returns them."""
        keep = {self.device_key(d) for d in active_devices}
        with self._zlock:
            freed = {k: z for k, z in self._zones.items() if k not in keep}
            for k in freed:
                del self._zones[k]
        return freed

    def load_zones(self, mapping: Mapping[str, int], replace: bool = False) -> None:
        """Add (or with ``replace``, set) ``{key: zone}`` entries."""
        checked = {}
        for key, zone in dict(mapping).items():
            if not isinstance(key, str) or not key:
                raise InvalidFilter(f"zone map key must be a non-empty string, not {key!r}")
            if isinstance(zone, bool) or not isinstance(zone, int) or not 0 <= zone <= MAX_ZONE:
                raise InvalidFilter(f"zone for {key} must be 0..65535, not {zone!r}")
            checked[key] = zone
        with self._zlock:
            if replace:
                self._zones.clear()
            self._zones.update(checked)

    def zone_map(self) -> Dict[str, int]:
        with self._zlock:
            return dict(self._zones)

    # -- cleanups --------------------------------------------------------------------
    def _zoned_ports(self, devices: Any) -> Tuple[List[Tuple[Port, str, int]], List[str]]:
        found, skipped = [], []
        for port in _as_ports(devices):
            if self._zone_of is not None:
                key = str(port.get("device", "?"))
                zone = self._port_zone(port)
            else:
                key = self.device_key(port)
                with self._zlock:
                    zone = self._zones.get(key)
            if zone is None:
                skipped.append(str(port.get("device", key)))
                LOG.debug("no conntrack zone for device %s: nothing to clean", key)
            else:
                found.append((port, key, zone))
        return found, skipped

    def delete_by_remote_ips(self, devices: Any, ethertype: Any, remote_ips: Iterable[Any],
                             mark: Any = None) -> CleanupHandle:
        """Entries between each device address (fixed IPs and allowed address
        pairs of ``ethertype``) and each remote IP/CIDR, both directions, in
        the device's zone; an empty ``remote_ips`` means every entry of the
        device addresses. ``mark``: int or (value, mask)."""
        family = _family_of(ethertype)
        remotes = list(remote_ips or ())
        found, skipped = self._zoned_ports(devices)
        filters: List[Filter] = []
        for port, _key, zone in found:
            filters += remote_ip_filters(zone, port_networks(port, family), family, remotes, mark)
        what = f"{len(remotes)} remote IPs" if remotes else "all remotes"
        return self._submit(f"remote-ips IPv{family} {what} on {len(found)} devices",
                            filters, skipped)

    def delete_by_rule(self, devices: Any, rule: Mapping) -> CleanupHandle:
        """Entries a security-group rule allowed, in each device's zone: see
        :func:`rule_filters` for the rule keys."""
        if not isinstance(rule, Mapping):
            raise InvalidFilter(f"rule must be a dict, not {rule!r}")
        rule_filters(1, [], rule)  # validate even when no device has a zone
        found, skipped = self._zoned_ports(devices)
        filters: List[Filter] = []
        for port, _key, zone in found:
            filters += rule_filters(zone, port_networks(port), rule)
        return self._submit(f"rule {rule.get('direction')} {rule.get('ethertype')} "
                            f"{rule.get('protocol') or 'any'} on {len(found)} devices",
                            filters, skipped)

    def delete_by_device(self, devices: Any, mark: Any = None, ethertype: Any = None,
                         whole_zone: bool = False, release_zones: bool = False) -> CleanupHandle:
        """Every entry of the devices' addresses in their zones (both
        families unless ``ethertype``). ``whole_zone``: the devices' whole
        zones instead (refused for a zone another key shares).
        ``release_zones``: forget the zones once this cleanup has run."""
        family = None if ethertype is None else _family_of(ethertype)
        if whole_zone and self._zone_of is not None:
            raise InvalidFilter("whole_zone refused: a zone taken from the port (zone_of, e.g. "
                                "its local VLAN) is shared by every port of its network")
        found, skipped = self._zoned_ports(devices)
        filters: List[Filter] = []
        release = []
        keys = {key for _p, key, _z in found}
        for port, key, zone in found:
            release.append((key, zone))
            if whole_zone:
                with self._zlock:
                    sharing = sorted(k for k, z in self._zones.items()
                                     if z == zone and k not in keys)
                if sharing:
                    raise InvalidFilter(f"zone {zone} of {key} is shared with "
                                        f"{', '.join(sharing)}: whole_zone would clean "
                                        "their connections too")
                if zone == 0:
                    raise InvalidFilter(f"{key} is in zone 0 (the host's): whole_zone refused")
                filters.append(Filter(zone=zone, family=family, mark=mark))
                continue
            for net in port_networks(port, family):
                filters.append(Filter(zone=zone, family=net.version, addr=net, mark=mark))
        return self._submit(f"device cleanup of {len(found)} devices", _unique(filters), skipped,
                            release_keys=release if release_zones else ())

    def delete_filters(self, filters: Iterable[Filter],
                       allow_default_zone: bool = False) -> CleanupHandle:
        """Queue raw Filters (coalesced like every other cleanup)."""
        fs = []
        for f in filters:
            if not isinstance(f, Filter):
                raise InvalidFilter(f"expected a pyconntrack.Filter, not {type(f).__name__}")
            if f.is_broad_on_default_zone() and not allow_default_zone:
                raise InvalidFilter(f"filter {f.describe()} matches all of zone 0 or every zone; "
                                    "pass allow_default_zone=True if that is really meant")
            fs.append(f)
        return self._submit(f"{len(fs)} filters", _unique(fs), [])

    # Neutron IpConntrackManager names
    delete_conntrack_state_by_rule = delete_by_rule
    delete_conntrack_state_by_remote_ips = delete_by_remote_ips

    # -- queue -----------------------------------------------------------------------
    def _submit(self, description: str, filters: List[Filter], skipped: List[str],
                release_keys: Sequence[Tuple[str, int]] = ()) -> CleanupHandle:
        filters = _unique(filters)
        handle = CleanupHandle(description, filters)
        request = _Request(handle, release_keys)
        with self._cond:
            if self._closing:
                raise ConntrackError("ConntrackManager is closed")
        if not filters:
            why = f"no zone for {', '.join(skipped)}" if skipped else "no matching device address"
            self._release(request)
            handle._finish(_empty_result(f"nothing to delete: {why}"), None)
            return handle
        with self._cond:
            if self._closing:
                raise ConntrackError("ConntrackManager is closed")
            self._pending[id(handle)] = handle
            handle._on_complete.append(lambda: self._forget(handle))
            self._queue.append(request)
            self._cond.notify_all()
        return handle

    def _forget(self, handle: CleanupHandle) -> None:
        with self._cond:
            self._pending.pop(id(handle), None)
            self.requests_done += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator["ConntrackManager"]:
        """Queue without running until the block ends, so that everything
        queued inside runs in one pass (like an agent's defer_apply)."""
        with self._cond:
            self._holds += 1
        try:
            yield self
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def _snapshot(self) -> List[CleanupHandle]:
        with self._cond:
            return list(self._pending.values())

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for every cleanup queued so far; False if ``timeout`` passed
        first. Results and errors stay on the handles."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in self._snapshot():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not h._event.wait(left):
                return False
        return True

    async def wait_async(self) -> None:
        """Await every cleanup queued so far (errors stay on the handles)."""
        handles = self._snapshot()
        if handles:
            await asyncio.gather(*(h.wait_async() for h in handles), return_exceptions=True)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def stats(self) -> dict:
        with self._cond:
            return {"walks": self.walks, "passes": self.passes,
                    "failed_passes": self.failed_passes, "requests_done": self.requests_done,
                    "pending": len(self._pending), "zones": len(self._zones)}

    # -- worker ----------------------------------------------------------------------
    def _worker(self) -> None:
        # probe the kernel now, off the caller's thread, not in the first cleanup
        warm = getattr(self._ct, "capabilities", None)
        if callable(warm):
            try:
                warm()
            except Exception as exc:  # the first pass will report it
                LOG.debug("conntrack capability probe failed: %s", exc)
        while True:
            with self._cond:
                while (not self._queue or self._holds) and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, nothing left
                batch, self._queue = self._queue, []
            try:
                for chunk in self._chunks(batch):
                    self._run_pass(chunk)
            except BaseException as exc:  # never die: fail what is left, keep serving
                LOG.exception("conntrack manager worker error")
                err = _as_error(exc)
                for req in batch:
                    if not req.handle.done():
                        self._release(req)
                        req.handle._finish(None, err)

    def _chunks(self, batch: List[_Request]) -> Iterator[List[_Request]]:
        chunk: List[_Request] = []
        size = 0
        for req in batch:
            n = len(req.handle.filters)
            if chunk and size + n > self.max_filters_per_pass:
                yield chunk
                chunk, size = [], 0
            chunk.append(req)
            size += n
        if chunk:
            yield chunk

    def _release(self, req: _Request) -> None:
        if not req.release_keys:
            return
        with self._zlock:
            for key, zone in req.release_keys:
                if self._zones.get(key) == zone:
                    del self._zones[key]

    def _run_pass(self, batch: List[_Request]) -> None:
        filters: List[Filter] = []
        index: Dict[Filter, int] = {}
        owned: List[List[int]] = []
        for req in batch:
            mine = []
            for f in req.handle.filters:
                if f not in index:  # identical filter of an earlier request: counted there
                    index[f] = len(filters)
                    filters.append(f)
                    mine.append(index[f])
            owned.append(mine)
        start = time.perf_counter()
        try:
            # inputs were validated at submit (zone-0 consent included)
            results = self._ct.delete_each(filters, allow_default_zone=True)
        except Exception as exc:
            err = _as_error(exc)
            with self._cond:
                self.passes += 1
                self.failed_passes += 1
            LOG.error("conntrack cleanup pass of %d requests (%d filters) failed: %s (errno %s)",
                      len(batch), len(filters), err, err.errno)
            for req in batch:
                self._release(req)
                req.handle._finish(None, err)
            return
        elapsed = time.perf_counter() - start
        walks = max((r.walks for r in results), default=0)
        strategy = results[0].strategy if results else "walk"
        with self._cond:
            self.passes += 1
            self.walks += walks
        reason = (f"coalesced pass: {len(batch)} requests, {len(filters)} filters, "
                  f"{walks} walk{'s' if walks != 1 else ''}")
        failed_total = 0
        for req, mine in zip(batch, owned):
            rs = [results[i] for i in mine]
            r = DeleteResult(sum(x.matched for x in rs), sum(x.deleted for x in rs),
                             sum(x.already_gone for x in rs), sum(x.failed for x in rs),
                             next((x.errno for x in rs if x.errno), 0), strategy, walks,
                             elapsed, reason)
            failed_total += r.failed
            self._release(req)
            req.handle._finish(r, None)
        if failed_total:
            first = next((x.errno for x in results if x.errno), 0)
            LOG.warning("conntrack cleanup: %d deletes failed (first errno %d: %s)",
                        failed_total, first, _errno.errorcode.get(first, "?"))
        LOG.debug("%s in %.3f s", reason, elapsed)


__all__ = [
    "CleanupHandle", "ConntrackManager", "ZonesExhausted", "parse_iptables_zones",
    "parse_nft_zones", "port_networks", "port_device_key", "of_port_zone",
    "remote_ip_filters", "rule_filters",
    "ZONE_START", "MAX_ZONE",
]
