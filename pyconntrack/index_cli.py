"""pyconntrack index attach|detach|status|audit: the eBPF zone index."""
from __future__ import annotations

import json

import os

from . import index as index_mod
from .conntrack import Conntrack
from .errors import InvalidFilter, PermissionDenied


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="eBPF zone index: attach, detach, status, audit, gc")
    p.add_argument("action", choices=["attach", "detach", "status", "audit", "gc"])
    p.add_argument("--netns", help="network namespace name (/var/run/netns) or path")
    p.add_argument("--pin-dir", help="detach: the index's pin directory (when its "
                   "namespace's name is gone)")
    p.add_argument("--max-records", type=int, default=0,
                   help="attach: records the index holds, however they are spread over "
                   "zones (default: nf_conntrack_max + 25%%; memory ~66 B per record "
                   "stored, and up to 4 KiB per zone in use)")
    p.add_argument("--preallocate", action="store_true",
                   help="attach: take the record map's whole bound up front (~200 B x "
                   "capacity) for a cheaper hook (not a cheaper machine: docs/index.md)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
        return
    for key, value in obj.items():
        if key == "zones":
            print(f"{'zones':<16} {len(value)} with records")
            for zone, z in sorted(value.items())[:50]:
                print(f"  zone {zone:<6} records {z['records']:<8} "
                      f"{'DIRTY (' + str(z['dirty']) + ' lost)' if z['dirty'] else ''}")
            if len(value) > 50:
                print(f"  ... {len(value) - 50} more (use --json)")
        elif key == "entries":
            for e in value[:20]:
                print(f"  missing: {e['family']} {e['proto']} zone={e['zone']} "
                      f"src={e['src']} dst={e['dst']} sport={e['sport']} dport={e['dport']}")
        else:
            print(f"{key:<16} {value}")


def run(args) -> int:
    if args.action in ("attach", "detach", "gc") and os.geteuid() != 0:
        raise PermissionDenied(f"index {args.action} needs root (CAP_BPF, CAP_NET_ADMIN)", 1,
                               "index")
    if args.pin_dir is not None:
        if args.action != "detach" or args.netns is not None:
            raise InvalidFilter("--pin-dir goes with detach, without --netns")
        index_mod.detach_pin_dir(args.pin_dir)
        _print({"detached": True, "pin_dir": args.pin_dir}, args.json)
        return 0
    if args.action == "gc":
        _print({"removed": index_mod.gc()}, args.json)
        return 0
    with Conntrack(args.netns) as ct:
        if args.action == "attach":
            r = ct.attach_index(max_records=args.max_records, preallocate=args.preallocate)
            _print({"attached": True, "already_attached": r.already_attached,
                    "pin_dir": r.pin_dir, "seeded": r.seeded, "lost": r.lost,
                    "seeded_from": r.how or None}, args.json)
        elif args.action == "detach":
            _print({"detached": ct.detach_index()}, args.json)
        elif args.action == "status":
            _print(ct.index_status(), args.json)
        else:
            audit = ct.index_audit()
            audit["entries"] = [e.to_dict() for e in audit["entries"]]
            _print(audit, args.json)
            if audit["missing"]:
                return 1
    return 0
