"""The drivers load the way Neutron loads firewall drivers; pyconntrack does
not import Neutron; the OVS firewall's zone comes from Neutron's real OFPort
(the OVS datapath itself is not exercised here)."""
from __future__ import annotations

import importlib.metadata
from ipaddress import ip_address
import subprocess
import sys
import uuid

import pytest

from neutron.agent import firewall as n_firewall
from neutron.agent.common import ovs_lib
from neutron.agent.linux import ip_conntrack as n_ct
from neutron.agent.linux import iptables_firewall as n_fw
from neutron.agent.linux.openvswitch_firewall import constants as ovsfw_consts
from neutron.agent.linux.openvswitch_firewall import firewall as n_ovsfw
from neutron_lib.utils import runtime

from pyconntrack import Conntrack
from pyconntrack import neutron as pct_neutron

from neutron_helpers import conntrack_list

GROUP = "neutron.agent.firewall_drivers"
DRIVERS = {
    "pyconntrack_iptables": n_fw.IptablesFirewallDriver,
    "pyconntrack_iptables_hybrid": n_fw.OVSHybridIptablesFirewallDriver,
    "pyconntrack_openvswitch": n_ovsfw.OVSFirewallDriver,
}


@pytest.mark.neutron
@pytest.mark.parametrize("alias", sorted(DRIVERS))
def test_driver_loads_through_its_entry_point_and_neutrons_loader(alias):
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    assert {"iptables", "iptables_hybrid", "openvswitch", "noop"} <= set(eps)  # Neutron's own
    cls = eps[alias].load()
    assert issubclass(cls, DRIVERS[alias]) and cls is not DRIVERS[alias]
    assert cls.__module__ == "pyconntrack.neutron_drivers"
    assert runtime.load_class_by_alias_or_classname(GROUP, alias) is cls
    assert n_firewall.load_firewall_driver_class(alias) is cls   # what the agent calls
    # by class path too, as an operator may write it
    assert runtime.load_class_by_alias_or_classname(
        GROUP, f"pyconntrack.neutron_drivers.{cls.__name__}") is cls


@pytest.mark.neutron
def test_importing_pyconntrack_does_not_import_neutron():
    code = ("import sys, pyconntrack, pyconntrack.neutron, pyconntrack.manager\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('neutron', 'neutron_lib', 'oslo_config', 'oslo_concurrency'))\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


class NeutronOvsManagerWithoutThread(n_ct.OvsIpConntrackManager):
    def _process_queue_worker(self):
        return


def of_port(port, vlan_tag, ofport=7):
    vif = ovs_lib.VifPort(f"tap{port['device'][:11]}", ofport, port["device"], port["mac_address"],
                          None)
    return n_ovsfw.OFPort(port, vif, vlan_tag)


def ovs_port(i):
    pid = str(uuid.uuid4())
    return {"device": pid, "mac_address": f"fa:16:3e:40:00:{i:02x}",
            "fixed_ips": [f"10.40.{i}.5", f"fd00:40:{i:x}::5"],
            "allowed_address_pairs": [{"ip_address": f"10.41.{i}.0/30",
                                       "mac_address": "fa:16:3e:41:00:01"}]}


@pytest.mark.neutron
def test_ovs_zone_is_the_ofport_vlan_tag():
    port = ovs_port(1)
    neutron = NeutronOvsManagerWithoutThread()
    mine = pct_neutron.OvsIpConntrackManager(conntrack=object())
    try:
        for tag in (1, 7, 4094):
            p = dict(port, of_port=of_port(port, tag))
            assert neutron.get_device_zone(p) == mine.get_device_zone(p) == tag
        assert neutron.get_device_zone(port) is mine.get_device_zone(port) is None
        assert mine._device_zone_map == {} and neutron._device_zone_map == {}
    finally:
        mine.close()


@pytest.mark.neutron
@pytest.mark.kernel
def test_ovs_invalid_entries_cleanup_in_a_namespace(netns, report):
    """The OVS firewall's cleanup (every entry of the port's addresses with
    mark CT_MARK_INVALID, IPv4 then IPv6) in the port's VLAN zone, with real
    OFPort objects; the table read with conntrack-tools."""
    ports = [ovs_port(i) for i in range(3)]
    tags = [5, 6, 5]   # ports 0 and 2 share a network (a local VLAN)
    for p, tag in zip(ports, tags):
        p["of_port"] = of_port(p, tag)
    mark = int(ovsfw_consts.CT_MARK_INVALID, 0)
    with Conntrack(netns) as ct:
        for i, p in enumerate(ports):
            for zone in (tags[i], 9, 0):
                for m, sport in ((0, 1000), (mark, 2000)):   # the mark is not in the tuple
                    ct.create_many(3, zone=zone, proto="tcp", src="192.0.2.9", dst=f"10.40.{i}.5",
                                   sport=sport, mark=m)
                    ct.create_many(2, zone=zone, proto="udp", src=f"10.41.{i}.2", dst="192.0.2.9",
                                   sport=sport, mark=m)
                    ct.create_many(2, zone=zone, family="ipv6", proto="tcp", src="2001:db8::9",
                                   dst=f"fd00:40:{i:x}::5", sport=sport, mark=m)
    before = conntrack_list(netns)
    mgr = pct_neutron.OvsIpConntrackManager(namespace=netns)
    try:
        for ethertype in ("IPv4", "IPv6"):   # what the OVS firewall calls
            mgr.delete_conntrack_state_by_remote_ips(ports[:2], ethertype, set(),
                                                     mark=ovsfw_consts.CT_MARK_INVALID)
        assert mgr.wait(60)
    finally:
        mgr.close()
    after = conntrack_list(netns)
    gone = {k for k, e in before.items()
            if e["mark"] == mark and any(
                e["zone"] == tags[i] and (
                    e["dst"] in (ip_address(f"10.40.{i}.5"), ip_address(f"fd00:40:{i:x}::5"))
                    or e["src"] == ip_address(f"10.41.{i}.2"))
                for i in range(2))}
    assert len(gone) == 2 * (3 + 2 + 2)
    assert set(after) == set(before) - gone
    report(f"OVS firewall cleanup (OFPort zones): {len(gone)} of {len(before)} deleted")
