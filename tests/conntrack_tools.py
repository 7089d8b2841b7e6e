"""conntrack-tools as an independent oracle: the kernel's table as
``conntrack -L -o extended`` prints it, parsed into comparable records.

Zones come from conntrack-tools' own words: ``zone=N`` (both directions),
``zone-orig=N`` after the original tuple, ``zone-reply=N`` after the reply
tuple. Nothing here uses pyconntrack's parser."""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
from types import SimpleNamespace
from typing import List

PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "gre": 47,
          "udplite": 136, "dccp": 33}


def available() -> bool:
    return shutil.which("conntrack") is not None


def parse_line(line: str) -> SimpleNamespace:
    tokens = line.split()
    family, proto_name = tokens[0], tokens[2]
    proto = PROTOS.get(proto_name, None)
    if proto is None:
        proto = int(tokens[3])
    seen: dict = {}
    rec = dict(family=family, proto=proto, zone=0, zone_dir="both", mark=0,
               sport=None, dport=None, icmp_type=None, icmp_code=None, icmp_id=None)
    for tok in tokens[4:]:
        if "=" not in tok:
            continue
        k, v = tok.split("=", 1)
        n = seen[k] = seen.get(k, 0) + 1
        first = n == 1
        if k in ("src", "dst"):
            rec[k if first else f"reply_{k}"] = ipaddress.ip_address(v)
        elif k in ("sport", "dport") and first:
            rec[k] = int(v)
        elif k in ("srckey", "dstkey") and first:   # GRE keys: the ports of the tuple
            rec["sport" if k == "srckey" else "dport"] = int(v, 16)
        elif k in ("type", "code", "id") and first:
            rec[f"icmp_{k}"] = int(v)
        elif k == "mark":
            rec["mark"] = int(v)
        elif k == "zone":
            rec["zone"], rec["zone_dir"] = int(v), "both"
        elif k == "zone-orig":
            rec["zone"], rec["zone_dir"] = int(v), "orig"
        elif k == "zone-reply":
            rec["zone"], rec["zone_dir"] = int(v), "reply"
    return SimpleNamespace(**rec)


def table(netns: str) -> List[SimpleNamespace]:
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-o", "extended"],
                         capture_output=True, text=True, check=True).stdout
    return [parse_line(line) for line in out.splitlines() if line.strip()]


def key(e) -> tuple:
    """Identity of an entry, for pyconntrack Entries and oracle records alike."""
    return (e.family, e.proto, e.zone, e.zone_dir, str(e.src), str(e.dst), e.sport, e.dport,
            e.icmp_type, e.icmp_id)
