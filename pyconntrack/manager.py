"""ConntrackManager: what a hypervisor agent (e.g. Neutron's L2 agent) embeds.

It joins three concerns, each in a module of its own (every name below stays
importable from here):

- Zones per device key (:mod:`pyconntrack.zone_maps`): ``get_device_zone(port,
  create=True)``, release, an initial map parsed from ``iptables-save -t raw``
  (``-j CT --zone N``) or from nftables (``ct zone set N``); allocation takes
  the highest zone in use + 1, then the first gap, and raises
  :class:`ZonesExhausted` only when every zone of the range is taken (after
  freeing the zones of removed devices when an ``active_devices`` callable is
  given).
- Cleanups on Neutron-style port dicts (:mod:`pyconntrack.rules`; ``device``:
  the port id, as Neutron's agents pass it, or the interface name;
  ``fixed_ips``, ``allowed_address_pairs``, ``network_id``; ``of_port`` with
  ``zone_of``): :meth:`delete_by_remote_ips`, :meth:`delete_by_rule`
  (protocol, port range, direction, ethertype, remote CIDR, mark) and
  :meth:`delete_by_device`. Each becomes precise filters (zone + address
  pair), deduplicated.
- A queue (:mod:`pyconntrack.cleanup_queue`): every cleanup returns a
  :class:`CleanupHandle` (a ``concurrent.futures.Future``) at once. One
  worker thread takes everything queued and runs it as a single table walk
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

import contextlib
import logging
import threading
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)

from .cleanup_queue import CleanupHandle, CleanupQueue
from .conntrack import Conntrack
from .errors import InvalidFilter
from .filter import Filter
from .rules import (Port, _as_port, _as_ports, _family_of, _unique, port_networks,
                    remote_ip_filters, rule_filters)
from .types import Capabilities
from .zone_maps import (DEV_KEY_LEN, MAX_ZONE, ZONE_START, ZoneMap, ZonesExhausted,
                        of_port_zone, parse_iptables_zones, parse_nft_zones,
                        port_device_key)

# importable from pyconntrack.manager before its split by concern (public API unchanged)
from .errors import ConntrackError  # noqa: F401
from .rules import Network  # noqa: F401
from .types import DeleteResult, PROTO_NUMBERS  # noqa: F401
from .zone_maps import DEV_PREFIX_LEN  # noqa: F401

LOG = logging.getLogger(__name__)


def _collect_gone_indexes() -> None:
    """An agent (re)start removes the eBPF indexes of namespaces that are gone
    (e.g. routers deleted while it was down): their pinned links would keep
    those namespaces and their conntrack tables alive. Best effort."""
    from . import index as index_mod
    try:
        removed = index_mod.gc()
    except (OSError, ConntrackError) as exc:
        LOG.debug("eBPF index gc skipped: %s", exc)
        return
    if removed:
        LOG.info("removed the eBPF zone index of %d gone namespaces", len(removed))


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
        self._zone_map = ZoneMap(zone_range)
        self.zone_per_port = zone_per_port
        self._device_key_fn = device_key
        self._zone_of = zone_of
        self._active_devices = active_devices
        if (isinstance(max_filters_per_pass, bool) or not isinstance(max_filters_per_pass, int)
                or max_filters_per_pass < 1):
            raise InvalidFilter(f"max_filters_per_pass must be a positive int, "
                                f"not {max_filters_per_pass!r}")
        if initial_zones:
            self.load_zones(initial_zones)
        self._own_ct = conntrack is None
        self._ct = Conntrack(netns, capabilities=capabilities) if conntrack is None else conntrack
        _collect_gone_indexes()
        self.netns = netns
        self._closed = False
        self._close_lock = threading.Lock()
        self._queue = CleanupQueue(self._ct, max_filters_per_pass,
                                   release=self._zone_map.release_if)

    # -- lifetime --------------------------------------------------------------------
    def __enter__(self) -> "ConntrackManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop taking requests, run what is queued, stop the worker (and close
        the Conntrack it opened). Returns False if the worker was still busy
        after ``timeout`` seconds. Idempotent."""
        if not self._queue.close(timeout):
            return False
        with self._close_lock:
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

    @property
    def _thread(self) -> threading.Thread:
        return self._queue.thread

    @property
    def zone_range(self) -> Tuple[int, int]:
        """``(first, last)``: the zones new keys get (assignable; keys keep theirs)."""
        return self._zone_map.zone_range

    @zone_range.setter
    def zone_range(self, value: Tuple[int, int]) -> None:
        self._zone_map.zone_range = value

    @property
    def max_filters_per_pass(self) -> int:
        return self._queue.max_filters_per_pass

    @max_filters_per_pass.setter
    def max_filters_per_pass(self, value: int) -> None:
        self._queue.max_filters_per_pass = value

    # the queue's counters: table walks done by the worker, delete_each calls
    # (successful or not), failed ones, requests finished
    walks = property(lambda self: self._queue.walks)
    passes = property(lambda self: self._queue.passes)
    failed_passes = property(lambda self: self._queue.failed_passes)
    requests_done = property(lambda self: self._queue.requests_done)

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
        if not create:
            return self._zone_map.get(key)
        active = self._active_devices
        return self._zone_map.allocate(
            key, None if active is None else lambda: {self.device_key(d) for d in active()})

    def _port_zone(self, port: Port) -> Optional[int]:
        zone = self._zone_of(port)
        if zone is None:
            return None
        if isinstance(zone, bool) or not isinstance(zone, int) or not 0 <= zone <= MAX_ZONE:
            raise InvalidFilter(f"zone of port {port.get('device', '?')} must be 0..65535, "
                                f"not {zone!r}")
        return zone or None  # 0: the host's zone is never a port's

    def release_device_zone(self, device: Any) -> Optional[int]:
        """Forget the device's zone (returned, or None if it had none). Queue
        its cleanup first, or use ``delete_by_device(..., release_zones=True)``."""
        return self._zone_map.release(self.device_key(device))

    def free_unused_zones(self, active_devices: Iterable[Any]) -> Dict[str, int]:
        """Drop the zones of every key not among ``active_devices``; returns them."""
        return self._zone_map.free_unused({self.device_key(d) for d in active_devices})

    def load_zones(self, mapping: Mapping[str, int], replace: bool = False) -> None:
        """Add (or with ``replace``, set) ``{key: zone}`` entries."""
        self._zone_map.load(mapping, replace=replace)

    def zone_map(self) -> Dict[str, int]:
        return self._zone_map.snapshot()

    # -- cleanups --------------------------------------------------------------------
    def _zoned_ports(self, devices: Any) -> Tuple[List[Tuple[Port, str, int]], List[str]]:
        found, skipped = [], []
        for port in _as_ports(devices):
            if self._zone_of is not None:
                key = str(port.get("device", "?"))
                zone = self._port_zone(port)
            else:
                key = self.device_key(port)
                zone = self._zone_map.get(key)
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
                sharing = self._zone_map.sharing(zone, besides=keys)
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
        return self._queue.submit(description, filters, skipped, release_keys)

    @contextlib.contextmanager
    def hold(self) -> Iterator["ConntrackManager"]:
        """Queue without running until the block ends, so that everything
        queued inside runs in one pass (like an agent's defer_apply)."""
        with self._queue.hold():
            yield self

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for every cleanup queued so far; False if ``timeout`` passed
        first. Results and errors stay on the handles."""
        return self._queue.wait(timeout)

    async def wait_async(self) -> None:
        """Await every cleanup queued so far (errors stay on the handles)."""
        await self._queue.wait_async()

    @property
    def pending(self) -> int:
        return self._queue.pending

    def stats(self) -> dict:
        return dict(self._queue.stats(), zones=len(self._zone_map))


__all__ = [
    "CleanupHandle", "ConntrackManager", "ZonesExhausted", "parse_iptables_zones",
    "parse_nft_zones", "port_networks", "port_device_key", "of_port_zone",
    "remote_ip_filters", "rule_filters",
    "ZONE_START", "MAX_ZONE",
]
