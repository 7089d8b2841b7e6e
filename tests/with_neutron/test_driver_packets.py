"""Neutron's OVSHybridIptablesFirewallDriver, real iptables, a Linux bridge
with br_netfilter and real packets, in scratch namespaces: the security
group rules Neutron writes decide which packets make conntrack entries; a
rule removed and a port removed through the driver clean what they should.

Run twice: with ``pyconntrack_iptables_hybrid`` (the drop-in) and with
Neutron's own driver and manager (its worker not started, its queue drained
by the test with its own ``_process_queue``), on the same traffic.

    vm netns         host netns (driver, conntrack)                 remote netns
    eth0 ------ tap<11> ]                                            
    10.30.0.5          [ qbr<11> bridge (br_netfilter on)          
    fd00:30::5         [ qvb<11> ------------------------------- eth0 10.30.0.1, fd00:30::1

OVS (qvo/br-int) is not involved: the remote side stands where br-int would.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from neutron.agent.linux import ip_conntrack as n_ct
from neutron.agent.linux import iptables_firewall as n_fw

from pyconntrack import netns as scratch
from pyconntrack import neutron as pct_neutron
from pyconntrack import neutron_drivers

from neutron_helpers import conntrack_list
from test_side_by_side import NeutronManagerWithoutThread, rules_func

pytestmark = [pytest.mark.neutron, pytest.mark.kernel]

VM4, REMOTE4 = "10.30.0.5", "10.30.0.1"
VM6, REMOTE6 = "fd00:30::5", "fd00:30::1"
MAC = "fa:16:3e:30:00:05"
SG = "6a1d2e3f-0000-4000-8000-0000000000b1"


def sg_rules():
    rules = [
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
         "port_range_min": 5000, "port_range_max": 5000},
        {"direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
         "port_range_min": 5001, "port_range_max": 5001},
        {"direction": "ingress", "ethertype": "IPv6", "protocol": "udp",
         "port_range_min": 5000, "port_range_max": 5000},
        {"direction": "egress", "ethertype": "IPv4"},
        {"direction": "egress", "ethertype": "IPv6"},
    ]
    for r in rules:
        r["security_group_id"] = SG
    return rules


def sh(*argv, ns=None, check=True, input=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    r = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed: {r.stderr or r.stdout}")
    return r.stdout


SENDER = """
import socket, sys
src, dst = sys.argv[1:3]
dport, first, count = map(int, sys.argv[3:6])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
for sport in range(first, first + count):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((src, sport))
    s.sendto(b"x", (dst, dport))
    s.close()
"""


def send_udp(ns, src, dst, dport, first_sport, count):
    sh(sys.executable, "-c", SENDER, src, dst, str(dport), str(first_sport), str(count), ns=ns)


class Topology:
    def __init__(self):
        self.port_id = str(uuid.uuid4())
        short = self.port_id[:11]
        self.tap, self.qvb, self.qbr = f"tap{short}", f"qvb{short}", f"qbr{short}"
        self._scratch = [scratch.scratch("pct-nfw-host"), scratch.scratch("pct-nfw-vm"),
                         scratch.scratch("pct-nfw-remote")]

    def __enter__(self):
        self.host, self.vm, self.remote = [s.__enter__() for s in self._scratch]
        try:
            self._setup()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        for s in reversed(self._scratch):
            s.__exit__(None, None, None)

    def _setup(self):
        h, v, r = self.host, self.vm, self.remote
        for ns in (h, v, r):
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
               "net.ipv6.conf.default.accept_dad=0", ns=ns)
        # br_netfilter: bridged packets pass iptables/ip6tables (per-namespace sysctls)
        sh("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1",
           "net.bridge.bridge-nf-call-ip6tables=1", "net.netfilter.nf_conntrack_udp_timeout=600",
           ns=h)
        sh("ip", "link", "add", self.qbr, "type", "bridge", ns=h)
        sh("ip", "link", "add", self.tap, "type", "veth", "peer", "name", "eth0", "netns", v, ns=h)
        sh("ip", "link", "add", self.qvb, "type", "veth", "peer", "name", "eth0", "netns", r, ns=h)
        for dev in (self.tap, self.qvb):
            sh("ip", "link", "set", dev, "master", self.qbr, "up", ns=h)
        sh("ip", "link", "set", self.qbr, "up", ns=h)
        sh("ip", "link", "set", "eth0", "address", MAC, ns=v)
        for ns, a4, a6 in ((v, VM4, VM6), (r, REMOTE4, REMOTE6)):
            sh("ip", "addr", "add", f"{a4}/24", "dev", "eth0", ns=ns)
            sh("ip", "addr", "add", f"{a6}/64", "dev", "eth0", "nodad", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)

    def port(self):
        return {"device": self.port_id, "id": self.port_id, "mac_address": MAC,
                "network_id": "7c1d2e3f-0000-4000-8000-0000000000c2",
                "device_owner": "compute:nova", "security_groups": [SG],
                "port_security_enabled": True, "fixed_ips": [VM4, VM6],
                "allowed_address_pairs": [], "security_group_source_groups": []}


def port_entries(ns, zone):
    """UDP entries of the VM's addresses, by (zone, direction, dport)."""
    out = {}
    for e in conntrack_list(ns).values():
        if e["proto"] != 17:
            continue
        if str(e["dst"]) in (VM4, VM6):
            k = (e["zone"], f"in{e['family']}", e["dport"])
        elif str(e["src"]) in (VM4, VM6):
            k = (e["zone"], f"out{e['family']}", e["dport"])
        else:
            continue
        out[k] = out.get(k, 0) + 1
    return out


def traffic(topo, base):
    send_udp(topo.remote, REMOTE4, VM4, 5000, base, 6)
    send_udp(topo.remote, REMOTE4, VM4, 5001, base, 5)
    send_udp(topo.remote, REMOTE4, VM4, 5002, base, 4)       # no rule: dropped
    send_udp(topo.remote, REMOTE6, VM6, 5000, base, 3)
    send_udp(topo.vm, VM4, REMOTE4, 7000, base, 7)           # egress
    time.sleep(0.3)


def settle(fw):
    mgr = fw.ipconntrack
    if isinstance(mgr, NeutronManagerWithoutThread):
        mgr.drain()
    else:
        assert mgr.wait(60)


@pytest.mark.parametrize("kind", ["pyconntrack", "neutron"])
def test_driver_cleans_what_the_removed_rule_and_port_allowed(kind, report):
    with Topology() as topo:
        h = topo.host
        if kind == "neutron":
            n_ct.CONTRACK_MGRS[h] = NeutronManagerWithoutThread(rules_func(h), {}, {},
                                                                namespace=h, zone_per_port=True)
            fw = n_fw.OVSHybridIptablesFirewallDriver(namespace=h)
        else:
            fw = neutron_drivers.OVSHybridIptablesFirewallDriver(namespace=h)
            assert isinstance(fw.ipconntrack, pct_neutron.IpConntrackManager)
        try:
            rules = sg_rules()
            fw.update_security_group_rules(SG, rules)
            port = topo.port()
            fw.prepare_port_filter(port)
            zone = fw.ipconntrack.get_device_zone(port, create=False)
            assert zone == 4097

            traffic(topo, 40000)
            before = port_entries(h, zone)
            assert before == {(zone, "in4", 5000): 6, (zone, "in4", 5001): 5,
                              (zone, "in6", 5000): 3, (zone, "out4", 7000): 7}, before

            # the agent's sequence for a rule removed from the group
            fw.filter_defer_apply_on()
            fw.security_group_updated("sg_rule", [SG])
            fw.update_security_group_rules(SG, [r for r in rules
                                                if r.get("port_range_min") != 5000
                                                or r["ethertype"] != "IPv4"])
            fw.update_port_filter(port)
            fw.filter_defer_apply_off()
            settle(fw)
            after_rule = port_entries(h, zone)
            if kind == "pyconntrack":   # what the removed rule allowed, nothing else
                assert after_rule == {(zone, "in4", 5001): 5, (zone, "in6", 5000): 3,
                                      (zone, "out4", 7000): 7}, after_rule
            else:                       # Neutron: every ingress UDP entry of the port (IPv4)
                assert after_rule == {(zone, "in6", 5000): 3, (zone, "out4", 7000): 7}, after_rule
            # the rule is gone from iptables: new packets to 5000 make no entry
            traffic(topo, 41000)
            again = port_entries(h, zone)
            assert again == {(zone, "in4", 5001): 5 + (5 if kind == "pyconntrack" else 0),
                             (zone, "in6", 5000): 3 + 3, (zone, "out4", 7000): 7 + 7}, again

            fw.remove_port_filter(port)
            settle(fw)
            left = port_entries(h, zone)
            assert left == {}, left
            report(f"driver {kind:11s} (packets): rule udp/5000 removed: "
                   f"{sum(before.values()) - sum(after_rule.values())} of "
                   f"{sum(before.values())} port entries deleted; port removed: "
                   f"{sum(again.values())} deleted, {len(left)} left")
        finally:
            n_ct.CONTRACK_MGRS.pop(h, None)
            mgr = pct_neutron.CONTRACK_MGRS.pop(h, None)
            if mgr is not None:
                mgr.close()
