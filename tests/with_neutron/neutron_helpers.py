"""Helpers for the Neutron tests (the kernel table read with conntrack-tools)."""
from __future__ import annotations

import ipaddress
import re
import subprocess


# -- the kernel table, read with conntrack-tools (not with pyconntrack) ----------------

_FIELD = re.compile(r"(\w+)=(\S+)")


def conntrack_list(netns: str) -> dict:
    """Every entry of the namespace, read with ``conntrack -L``: a key
    (zone, family, proto, src, dst, sport|icmp id, dport|icmp type, mark)
    -> the parsed fields."""
    out = {}
    for family in ("ipv4", "ipv6"):
        r = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-f", family],
                           capture_output=True, text=True, check=True)
        for line in r.stdout.splitlines():
            tokens = line.split()
            if len(tokens) < 3:
                continue
            fields = {}
            for k, v in _FIELD.findall(line):
                fields.setdefault(k, v)  # first occurrence: the original direction
            e = {"family": 4 if family == "ipv4" else 6, "proto": int(tokens[1]),
                 "src": ipaddress.ip_address(fields["src"]),
                 "dst": ipaddress.ip_address(fields["dst"]),
                 "sport": int(fields["sport"]) if "sport" in fields else None,
                 "dport": int(fields["dport"]) if "dport" in fields else None,
                 "icmp": (int(fields["type"]), int(fields["id"])) if "type" in fields else None,
                 "mark": int(fields.get("mark", 0)), "zone": int(fields.get("zone", 0))}
            key = (e["zone"], e["family"], e["proto"], str(e["src"]), str(e["dst"]),
                   e["sport"], e["dport"], e["icmp"], e["mark"])
            assert key not in out, f"two entries read as one: {line}"
            out[key] = e
    return out
