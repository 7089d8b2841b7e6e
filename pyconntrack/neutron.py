"""Drop-in conntrack managers for OpenStack Neutron's L2 agents.

Neutron's firewall drivers clean conntrack state through
``neutron.agent.linux.ip_conntrack``: :class:`IpConntrackManager` (the
iptables drivers; zones per port for the OVS-hybrid driver, per network for
the plain one), :class:`OvsIpConntrackManager` (the OVS firewall: the zone is
the port's local VLAN) and :func:`get_conntrack` (one manager per
namespace). This module has the same names, constructor arguments, methods
and queue contract, backed by :class:`pyconntrack.ConntrackManager`: every
call is queued and returns at once; one worker runs everything queued in one
pass (one table walk, or the eBPF index), instead of one ``conntrack -D``
process (a full table walk each) per device address, remote IP and
direction.

Importing this module does not import Neutron; :mod:`pyconntrack.neutron_drivers`
(the firewall drivers registered as ``neutron.agent.firewall_drivers`` entry
points) does.

Where the result differs from Neutron's on purpose (docs/neutron.md lists
them with examples):

1. Rule removal deletes what the removed rule allowed: its protocol, port
   range (TCP/UDP/SCTP/DCCP/UDP-Lite destination and source ports) and
   remote IP prefix are matched. Neutron matches only protocol, direction,
   ethertype and mark, so it also cuts connections the remaining rules
   still allow. (A rule's ``remote_group_id`` is not expanded: such a rule
   cleans every remote, like Neutron.)
2. ``icmp`` in an IPv6 rule means ICMPv6 (as in Neutron's firewall rules);
   Neutron's manager runs ``conntrack -p icmp -f ipv6``, which matches
   nothing (its iptables drivers usually rewrite such a rule to
   ``ipv6-icmp`` first).
3. A remote IP of the other family is skipped; Neutron runs the command
   without the remote, deleting every entry of the device address in that
   direction.
4. A device given as an interface name (``tap…``, ``qvb…``) finds the zone
   of its port id (see :func:`pyconntrack.manager.port_device_key`);
   Neutron would key ``tap8f46cf1`` and miss it.
5. Zones are looked up when the call is made, not when the queue runs it
   (Neutron looks them up in its worker); errors are logged, as in Neutron,
   and also reported on the returned handle.
6. Deletes carry zone and conntrack id: a newer connection reusing a tuple
   is never hit, and an entry matched by several queued requests is deleted
   and counted once.
7. The ``execute`` argument is accepted and ignored (nothing is executed);
   the manager's worker is a daemon thread with :meth:`close`.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from .errors import ConntrackError
from .manager import (CleanupHandle, ConntrackManager, ZonesExhausted, of_port_zone,
                      parse_iptables_zones)

LOG = logging.getLogger(__name__)

MAX_CONNTRACK_ZONES = 65535
ZONE_START = 4097
LINUX_DEV_LEN = 14           # neutron-lib constants.LINUX_DEV_LEN
LINUX_DEV_PREFIX_LEN = 3     # neutron-lib constants.LINUX_DEV_PREFIX_LEN

CONTRACK_MGRS: Dict[Optional[str], "IpConntrackManager"] = {}  # Neutron's (mis)spelling
_MGRS_LOCK = threading.Lock()


def _zones_exhausted(exc: ZonesExhausted) -> Exception:
    """The error Neutron's callers expect (neutron-lib's CTZoneExhaustedError)
    when neutron-lib is installed, still a ZonesExhausted."""
    try:
        from neutron_lib.exceptions import CTZoneExhaustedError
    except ImportError:
        return exc

    class ZonesExhaustedError(ZonesExhausted, CTZoneExhaustedError):
        def __init__(self, message: str, errno: Optional[int], operation: Optional[str]) -> None:
            Exception.__init__(self, message)   # NeutronException takes keywords only
            self.msg = message
            self.errno, self.operation = errno, operation

        def __str__(self) -> str:
            return self.msg

    err = ZonesExhaustedError(str(exc), exc.errno, None)
    err.__cause__ = exc
    return err


def _mark(mark: Any) -> Any:
    """Neutron passes marks as ``conntrack -m`` text (the OVS firewall's
    CT_MARK_INVALID is ``'0x1'``): ``'0x1'``, ``'5'``, ``'0x1/0xff'``;
    falsy means no mark, as in Neutron."""
    if not mark:
        return None
    if isinstance(mark, str):
        text = mark.strip()
        try:
            if "/" in text:
                value, mask = text.split("/", 1)
                return (int(value, 0), int(mask, 0))
            return int(text, 0)
        except ValueError:
            raise ValueError(f"conntrack mark {mark!r} is not a number (or number/mask)") from None
    return mark


def _log_failure(handle: CleanupHandle) -> None:
    try:
        r = handle.wait(0)
    except TimeoutError:
        return
    except Exception as exc:  # the pass failed: Neutron logs and goes on
        LOG.error("conntrack cleanup %s failed: %s (errno %s)", handle.description, exc,
                  getattr(exc, "errno", None))
        return
    if r.failed:
        LOG.warning("conntrack cleanup %s: %d deletes failed (errno %d)", handle.description,
                    r.failed, r.errno)


class IpConntrackManager:
    """Neutron's ``IpConntrackManager``, backed by pyconntrack.

    ``get_rules_for_table_func('raw')`` gives the raw table's rules (lines of
    ``iptables-save``); ``filtered_ports``/``unfiltered_ports`` are the
    firewall's ``{device: port}`` dicts (read when zones run out);
    ``namespace`` is the network namespace to clean (None: this one);
    ``zone_per_port`` keys zones by port (``device``) or by ``network_id``.
    Keyword-only extras: ``conntrack`` (an existing Conntrack to use),
    ``capabilities`` (lower what the kernel probe allows).

    ``delete_conntrack_state_by_rule`` and
    ``delete_conntrack_state_by_remote_ips`` queue and return at once (a
    :class:`~pyconntrack.CleanupHandle`, which Neutron's callers ignore;
    ``wait()`` waits for everything queued). Errors are logged, never raised
    into the firewall driver, as in Neutron.
    """

    def __init__(self, get_rules_for_table_func: Optional[Callable[[str], Any]],
                 filtered_ports: Optional[Mapping[str, Any]],
                 unfiltered_ports: Optional[Mapping[str, Any]], execute: Any = None,
                 namespace: Optional[str] = None, zone_per_port: bool = False, *,
                 conntrack: Any = None, capabilities: Any = None,
                 _zone_of: Optional[Callable[[Mapping], Optional[int]]] = None) -> None:
        self.get_rules_for_table_func = get_rules_for_table_func
        self.execute = execute  # accepted for Neutron's signature; nothing is executed
        self.namespace = namespace
        self.filtered_ports = filtered_ports if filtered_ports is not None else {}
        self.unfiltered_ports = unfiltered_ports if unfiltered_ports is not None else {}
        self.zone_per_port = zone_per_port
        self._engine = ConntrackManager(
            namespace, (ZONE_START, MAX_CONNTRACK_ZONES), zone_per_port=zone_per_port,
            zone_of=_zone_of, active_devices=self._current_ports, conntrack=conntrack,
            capabilities=capabilities)
        self._populate_initial_zone_map()

    # -- lifetime ----------------------------------------------------------------
    @property
    def engine(self) -> ConntrackManager:
        """The pyconntrack ConntrackManager doing the work."""
        return self._engine

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for every cleanup queued so far (False if ``timeout`` passed)."""
        return self._engine.wait(timeout)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Run what is queued and stop the worker."""
        return self._engine.close(timeout)

    def _bind(self, get_rules_for_table_func: Callable[[str], Any],
              filtered_ports: Mapping[str, Any], unfiltered_ports: Mapping[str, Any]) -> None:
        """Give a manager made before its firewall driver the driver's rules
        function and port dicts (only the first driver's, as
        ``get_conntrack`` does); loads the zone map."""
        if self.get_rules_for_table_func is not None:
            return
        self.get_rules_for_table_func = get_rules_for_table_func
        self.filtered_ports = filtered_ports
        self.unfiltered_ports = unfiltered_ports
        self._populate_initial_zone_map()

    # -- zones -------------------------------------------------------------------
    def _populate_initial_zone_map(self) -> None:
        """The zones of the raw table's ``-m physdev --physdev-in <dev> ...
        -j CT --zone N`` rules, keyed by ``<dev>`` without its 3-character
        prefix (``-i`` rules, ``--notrack`` and negated matches are not read)."""
        if self.get_rules_for_table_func is None:
            self._engine.load_zones({}, replace=True)
            return
        rules = self.get_rules_for_table_func("raw")
        zones = parse_iptables_zones(rules if rules is not None else [],
                                     prefix_len=LINUX_DEV_PREFIX_LEN, key_len=15)
        self._engine.load_zones(zones, replace=True)
        LOG.debug("Populated conntrack zone map: %s", zones)

    @property
    def _device_zone_map(self) -> Dict[str, int]:
        """A copy of the zone map (key -> zone); assigning replaces it."""
        return self._engine.zone_map()

    @_device_zone_map.setter
    def _device_zone_map(self, mapping: Mapping[str, int]) -> None:
        self._engine.load_zones(mapping, replace=True)

    def _current_ports(self) -> List[Any]:
        return list(self.filtered_ports.values()) + list(self.unfiltered_ports.values())

    def _device_key(self, port: Mapping[str, Any]) -> str:
        return self._engine.device_key(port)

    def get_device_zone(self, port: Mapping[str, Any], create: bool = True) -> Optional[int]:
        """The port's zone; with ``create``, a new one if it has none
        (highest + 1, then the first gap; when all are taken, the zones of
        ports no longer in the firewall's port dicts are freed once)."""
        try:
            return self._engine.get_device_zone(port, create=create)
        except ZonesExhausted as exc:
            raise _zones_exhausted(exc) from None

    def _free_zones_from_removed_ports(self) -> None:
        self._engine.free_unused_zones(self._current_ports())

    # -- cleanups ----------------------------------------------------------------
    def _zoned(self, device_info_list: Iterable[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
        # Neutron skips a device whose zone is falsy: zone 0 is never cleaned
        out = []
        for dev in device_info_list or ():
            try:
                zone = self.get_device_zone(dev, create=False)
            except Exception as exc:
                LOG.error("conntrack: no zone for %r: %s", dev, exc)
                continue
            if zone:
                out.append(dev)
            else:
                LOG.debug("No zone for device %s. Will not try to clear conntrack state.",
                          dev.get("device") if isinstance(dev, Mapping) else dev)
        return out

    def _queue(self, what: str, call: Callable[[], CleanupHandle]) -> Optional[CleanupHandle]:
        try:
            handle = call()
        except (ConntrackError, ValueError, TypeError) as exc:
            LOG.error("conntrack cleanup %s not queued: %s", what, exc)
            return None
        handle.add_done_callback(_log_failure)
        return handle

    def delete_conntrack_state_by_rule(self, device_info_list: Iterable[Mapping[str, Any]],
                                       rule: Mapping[str, Any]) -> Optional[CleanupHandle]:
        """Queue the deletion of the connections ``rule`` allowed on the
        devices (their fixed IPs and allowed address pairs, in their zones)."""
        devices = self._zoned(device_info_list)

        def call() -> CleanupHandle:
            r = dict(rule)
            if "mark" in r:
                r["mark"] = _mark(r["mark"])
            return self._engine.delete_by_rule(devices, r)
        return self._queue(f"by rule {rule!r}", call)

    def delete_conntrack_state_by_remote_ips(self, device_info_list: Iterable[Mapping[str, Any]],
                                             ethertype: Any, remote_ips: Iterable[Any],
                                             mark: Any = None) -> Optional[CleanupHandle]:
        """Queue the deletion of the devices' connections with ``remote_ips``
        (both directions); an empty ``remote_ips`` means every connection of
        the devices' addresses of ``ethertype``. ``mark``: only entries with
        this conntrack mark (ignored when falsy, as in Neutron)."""
        devices = self._zoned(device_info_list)
        remotes = list(remote_ips or ())
        return self._queue(
            f"by remote IPs ({ethertype}, {len(remotes)} remotes)",
            lambda: self._engine.delete_by_remote_ips(devices, ethertype, remotes,
                                                      mark=_mark(mark)))


class OvsIpConntrackManager(IpConntrackManager):
    """Neutron's ``OvsIpConntrackManager``: the zone of a port is its local
    VLAN, ``port["of_port"].vlan_tag``; there is no zone map. ``namespace``
    (keyword-only, not in Neutron) defaults to this namespace."""

    def __init__(self, execute: Any = None, *, namespace: Optional[str] = None,
                 conntrack: Any = None, capabilities: Any = None) -> None:
        super().__init__(None, {}, {}, execute=execute, namespace=namespace,
                         zone_per_port=False, conntrack=conntrack, capabilities=capabilities,
                         _zone_of=of_port_zone)

    def _populate_initial_zone_map(self) -> None:
        return

    def get_device_zone(self, port: Mapping[str, Any], create: bool = False) -> Optional[int]:
        """``port["of_port"].vlan_tag`` (None without ``of_port``); never creates."""
        return self._engine.get_device_zone(port, create=False)


def get_conntrack(get_rules_for_table_func: Callable[[str], Any],
                  filtered_ports: Mapping[str, Any], unfiltered_ports: Mapping[str, Any],
                  execute: Any = None, namespace: Optional[str] = None,
                  zone_per_port: bool = False) -> IpConntrackManager:
    """One :class:`IpConntrackManager` per namespace, made by the first caller
    (later callers' arguments are ignored, as in Neutron)."""
    with _MGRS_LOCK:
        mgr = CONTRACK_MGRS.get(namespace)
        if mgr is None:
            mgr = IpConntrackManager(get_rules_for_table_func, filtered_ports, unfiltered_ports,
                                     execute, namespace, zone_per_port)
            CONTRACK_MGRS[namespace] = mgr
        else:
            mgr._bind(get_rules_for_table_func, filtered_ports, unfiltered_ports)
        return mgr


def _unbound_conntrack(namespace: Optional[str], zone_per_port: bool) -> IpConntrackManager:
    """The namespace's manager, made without rules or port dicts if it does
    not exist yet (a firewall driver binds them once it has them)."""
    with _MGRS_LOCK:
        mgr = CONTRACK_MGRS.get(namespace)
        if mgr is None:
            mgr = IpConntrackManager(None, None, None, namespace=namespace,
                                     zone_per_port=zone_per_port)
            CONTRACK_MGRS[namespace] = mgr
        return mgr


__all__ = ["IpConntrackManager", "OvsIpConntrackManager", "get_conntrack", "CONTRACK_MGRS",
           "MAX_CONNTRACK_ZONES", "ZONE_START"]
