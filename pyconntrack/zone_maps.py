"""Conntrack zones per device key: the keys Neutron derives from port ids and
interface names, the initial maps read from ``iptables-save -t raw``
(``-j CT --zone N``) and ``nft list ruleset`` (``ct zone set N``), and
:class:`ZoneMap`, the thread-safe allocator :class:`~pyconntrack.manager.ConntrackManager`
keeps (the highest zone in use + 1, then the first gap; :class:`ZonesExhausted`
only when every zone of the range is taken)."""
from __future__ import annotations

import errno as _errno
import logging
import re
import shlex
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from .errors import ConntrackError, InvalidFilter

LOG = logging.getLogger(__name__)

ZONE_START = 4097          # Neutron: above OVS local VLANs 1..4096 (bug 1745642)
MAX_ZONE = 65535
DEV_PREFIX_LEN = 3         # "tap", "qvb", "brq" (neutron-lib LINUX_DEV_PREFIX_LEN)
DEV_KEY_LEN = 11           # LINUX_DEV_LEN 14 - prefix: the UUID fragment in a name


class ZonesExhausted(ConntrackError):
    """Every zone of the manager's range is mapped to a device key."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENOSPC, "get_device_zone")


# -- device keys -----------------------------------------------------------------------

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


# -- initial zone maps ---------------------------------------------------------------

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


# -- allocation ------------------------------------------------------------------------

def check_zone_range(zone_range: Any) -> Tuple[int, int]:
    """``(first, last)`` as ints with 1 <= first <= last <= 65535, else InvalidFilter."""
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


class ZoneMap:
    """Device key -> zone, allocating from ``zone_range`` (thread-safe).

    A key keeps its zone until released; several keys may share a zone (as
    loaded from an agent's rules). A new key gets the highest zone in use
    + 1, then the first gap of the range (zone 0, the host's, never)."""

    def __init__(self, zone_range: Tuple[int, int] = (ZONE_START, MAX_ZONE),
                 initial: Optional[Mapping[str, int]] = None) -> None:
        self._lock = threading.RLock()
        self.zone_range = zone_range
        self._zones: Dict[str, int] = {}
        if initial:
            self.load(initial)

    @property
    def zone_range(self) -> Tuple[int, int]:
        return self._range

    @zone_range.setter
    def zone_range(self, value: Any) -> None:
        checked = check_zone_range(value)
        with self._lock:
            self._range = checked

    def __len__(self) -> int:
        with self._lock:
            return len(self._zones)

    def get(self, key: str) -> Optional[int]:
        with self._lock:
            return self._zones.get(key)

    def allocate(self, key: str,
                 active_keys: Optional[Callable[[], Iterable[str]]] = None) -> int:
        """The key's zone, allocated if it has none. When the range is full
        and ``active_keys`` is given, the zones of every other key are freed
        and allocation retried once; else (or still full) ZonesExhausted."""
        with self._lock:
            zone = self._zones.get(key)
            if zone is not None:
                return zone
            try:
                zone = self._find_open_zone()
            except ZonesExhausted:
                if active_keys is None:
                    raise
                freed = self.free_unused(active_keys())
                LOG.info("conntrack zones exhausted: freed %d zones of removed devices", len(freed))
                zone = self._find_open_zone()
            self._zones[key] = zone
            LOG.debug("assigned conntrack zone %d to device key %s", zone, key)
            return zone

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

    def release(self, key: str) -> Optional[int]:
        """Forget the key; its zone (None if it had none)."""
        with self._lock:
            return self._zones.pop(key, None)

    def release_if(self, pairs: Iterable[Tuple[str, int]]) -> None:
        """Forget each ``(key, zone)`` whose key still maps to that zone."""
        with self._lock:
            for key, zone in pairs:
                if self._zones.get(key) == zone:
                    del self._zones[key]

    def free_unused(self, keep: Iterable[str]) -> Dict[str, int]:
        """Drop every key not in ``keep``; returns what was dropped."""
        keep = set(keep)
        with self._lock:
            freed = {k: z for k, z in self._zones.items() if k not in keep}
            for k in freed:
                del self._zones[k]
        return freed

    def load(self, mapping: Mapping[str, int], replace: bool = False) -> None:
        """Add (or with ``replace``, set) ``{key: zone}`` entries (validated first)."""
        checked = {}
        for key, zone in dict(mapping).items():
            if not isinstance(key, str) or not key:
                raise InvalidFilter(f"zone map key must be a non-empty string, not {key!r}")
            if isinstance(zone, bool) or not isinstance(zone, int) or not 0 <= zone <= MAX_ZONE:
                raise InvalidFilter(f"zone for {key} must be 0..65535, not {zone!r}")
            checked[key] = zone
        with self._lock:
            if replace:
                self._zones.clear()
            self._zones.update(checked)

    def sharing(self, zone: int, besides: Iterable[str] = ()) -> List[str]:
        """The keys mapped to ``zone``, but for ``besides``, sorted."""
        besides = set(besides)
        with self._lock:
            return sorted(k for k, z in self._zones.items() if z == zone and k not in besides)

    def snapshot(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._zones)


__all__ = [
    "DEV_KEY_LEN", "DEV_PREFIX_LEN", "MAX_ZONE", "ZONE_START", "ZoneMap", "ZonesExhausted",
    "check_zone_range", "of_port_zone", "parse_iptables_zones", "parse_nft_zones",
    "port_device_key",
]
