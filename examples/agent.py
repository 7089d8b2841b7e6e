#!/usr/bin/env python3
"""An agent-style loop on ConntrackManager, against a scratch netns (root).

What a Neutron-like L2 agent does: load the zone map from the raw table's
`-j CT --zone` rules, give new ports a zone, and when security groups change
or ports go away, queue conntrack cleanups. One worker runs everything queued
in a single table walk; each handle gets its own result.

    sudo .venv/bin/python examples/agent.py
"""
from __future__ import annotations

import asyncio

from pyconntrack import Conntrack, Filter
from pyconntrack.manager import ConntrackManager, parse_iptables_zones
from pyconntrack.netns import scratch

# what `iptables-save -t raw` shows on a hypervisor with two ports
RAW = """*raw
-A neutron-openvswi-PREROUTING -m physdev --physdev-in tap8f46cf18-12 -m comment --comment "Set zone for 8f46cf18-12" -j CT --zone 4097
-A neutron-openvswi-PREROUTING -m physdev --physdev-in tap95c24827-02 -m comment --comment "Set zone for 95c24827-02" -j CT --zone 4098
COMMIT"""  # noqa: E501

PORTS = {
    "web": {"device": "tap8f46cf18-12", "network_id": "n1",
            "fixed_ips": ["10.0.0.5", "fd00::5"],
            "allowed_address_pairs": [{"ip_address": "10.0.9.0/24",
                                       "mac_address": "fa:16:3e:00:00:01"}]},
    "db": {"device": "tap95c24827-02", "network_id": "n1", "fixed_ips": ["10.0.0.6"]},
    "new": {"device": "tapc0ffee00-77", "network_id": "n1", "fixed_ips": ["10.0.0.7"]},
}


def simulate_traffic(ct: Conntrack, zones: dict) -> None:
    """Connections the VMs would have: clients -> web:22/443, web -> db:5432."""
    web, db, new = zones["web"], zones["db"], zones["new"]
    ct.create_many(200, zone=web, proto="tcp", src="203.0.113.10", dst="10.0.0.5", dport=22)
    ct.create_many(500, zone=web, proto="tcp", src="203.0.113.11", dst="10.0.0.5", dport=443)
    ct.create_many(100, zone=web, proto="tcp", src="10.0.0.5", dst="10.0.0.6", dport=5432)
    ct.create_many(100, zone=db, proto="tcp", src="10.0.0.5", dst="10.0.0.6", dport=5432)
    ct.create_many(50, zone=web, family="ipv6", proto="udp", src="fd00::5", dst="2001:db8::53",
                   dport=53)
    ct.create_many(30, zone=new, proto="udp", src="10.0.0.7", dst="192.0.2.53", dport=53)


def show(what: str, handle) -> None:
    r = handle.wait()
    print(f"  {what:<44} deleted {r.deleted:4d}  failed {r.failed}  ({r.reason})")


def main() -> None:
    with scratch("pct-agent") as ns, Conntrack(ns) as ct, \
            ConntrackManager(ns, initial_zones=parse_iptables_zones(RAW)) as mgr:
        zones = {name: mgr.get_device_zone(port) for name, port in PORTS.items()}
        print(f"zones: {zones}  (new port: highest + 1)")
        simulate_traffic(ct, zones)
        print(f"entries: {ct.table_count()}")

        # one agent iteration: everything queued here runs in one walk
        with mgr.hold():
            ssh = mgr.delete_by_rule([PORTS["web"]], {
                "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0"})
            member = mgr.delete_by_remote_ips([PORTS["db"]], "IPv4", ["10.0.0.5"])
            gone = mgr.delete_by_device([PORTS["new"]], release_zones=True)
        print("after SG rule removed, remote-group member removed, port deleted:")
        show("ingress tcp/22 rule removed from web", ssh)
        show("web (10.0.0.5) left db's remote group", member)
        show("port 'new' deleted (zone released)", gone)
        print(f"table walks: {mgr.walks}; 'new' zone now: "
              f"{mgr.get_device_zone(PORTS['new'], create=False)}")
        print(f"left: web tcp/443 {ct.count(Filter(zone=zones['web'], dport=443))}, "
              f"web->db in web's zone {ct.count(Filter(zone=zones['web'], dport=5432))}, "
              f"db {ct.count(Filter(zone=zones['db']))}")

        # from asyncio: handles are awaitable, the loop never blocks
        async def on_port_removed(port):
            return await mgr.delete_by_device([port])

        r = asyncio.run(on_port_removed(PORTS["web"]))
        print(f"async: web port removed, deleted {r.deleted}; entries left: {ct.table_count()}")


if __name__ == "__main__":
    main()
