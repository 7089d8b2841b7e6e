"""Neutron firewall drivers whose conntrack cleanup is pyconntrack's.

Each is Neutron's own driver (subclassed, nothing else changed) with
:mod:`pyconntrack.neutron`'s manager in place of Neutron's. They are
registered as ``neutron.agent.firewall_drivers`` entry points, so an
operator switches with one line of the agent's configuration::

    [securitygroup]
    firewall_driver = pyconntrack_iptables_hybrid   # was: iptables_hybrid

This module imports Neutron (the rest of pyconntrack never does).

- ``pyconntrack_iptables_hybrid``: OVSHybridIptablesFirewallDriver (zones
  per port). ``pyconntrack_iptables``: IptablesFirewallDriver (zones per
  network). Neutron's drivers take their manager from
  ``ip_conntrack.get_conntrack``, which returns the namespace's manager from
  ``ip_conntrack.CONTRACK_MGRS`` when there is one: these drivers put
  pyconntrack's manager there first, so Neutron never makes its own, then
  hand it the driver's raw-table rules and port dicts.
- ``pyconntrack_openvswitch``: OVSFirewallDriver. Neutron's driver makes an
  ``OvsIpConntrackManager`` in its constructor; it is replaced right after,
  and the idle worker thread it started is stopped.
"""
from __future__ import annotations

import logging

from neutron.agent.linux import ip_conntrack as _n_ct
from neutron.agent.linux import iptables_firewall as _n_iptables
from neutron.agent.linux.openvswitch_firewall import firewall as _n_ovsfw
from oslo_concurrency import lockutils

from . import neutron as _pct_neutron

LOG = logging.getLogger(__name__)


def _install_manager(namespace, zone_per_port):
    """Put pyconntrack's manager for ``namespace`` where Neutron's
    ``get_conntrack`` looks first (under the lock it takes)."""
    with lockutils.lock("conntrack"):
        current = _n_ct.CONTRACK_MGRS.get(namespace)
        if isinstance(current, _pct_neutron.IpConntrackManager):
            return current
        if current is not None:
            LOG.warning("replacing Neutron's conntrack manager of namespace %s by pyconntrack's "
                        "(made before this driver)", namespace)
            _retire(current)
        mgr = _pct_neutron._unbound_conntrack(namespace, zone_per_port)
        _n_ct.CONTRACK_MGRS[namespace] = mgr
        return mgr


class _StopWorker:
    """Put in a replaced Neutron manager's queue: its worker catches
    Exception only, so this ends the thread that waits on the queue."""

    @property
    def remote_ips(self):
        raise SystemExit


def _retire(neutron_manager) -> None:
    q = getattr(neutron_manager, "_queue", None)
    if q is not None and hasattr(q, "put"):
        q.put(_StopWorker())


class _PyconntrackIptables:
    def __init__(self, namespace=None):
        mgr = _install_manager(namespace, self.CONNTRACK_ZONE_PER_PORT)
        super().__init__(namespace=namespace)
        if self.ipconntrack is not mgr:  # someone else's manager won a race: use ours anyway
            LOG.warning("firewall driver got conntrack manager %r, using pyconntrack's",
                        self.ipconntrack)
            self.ipconntrack = mgr
        mgr._bind(self.iptables.get_rules_for_table, self.filtered_ports, self.unfiltered_ports)


class IptablesFirewallDriver(_PyconntrackIptables, _n_iptables.IptablesFirewallDriver):
    """Neutron's IptablesFirewallDriver with pyconntrack's conntrack manager."""


class OVSHybridIptablesFirewallDriver(_PyconntrackIptables,
                                      _n_iptables.OVSHybridIptablesFirewallDriver):
    """Neutron's OVSHybridIptablesFirewallDriver with pyconntrack's conntrack manager."""


class OVSFirewallDriver(_n_ovsfw.OVSFirewallDriver):
    """Neutron's OVSFirewallDriver with pyconntrack's conntrack manager."""

    def __init__(self, integration_bridge):
        super().__init__(integration_bridge)
        replaced = self.ipconntrack
        self.ipconntrack = _pct_neutron.OvsIpConntrackManager()
        _retire(replaced)


__all__ = ["IptablesFirewallDriver", "OVSHybridIptablesFirewallDriver", "OVSFirewallDriver"]
