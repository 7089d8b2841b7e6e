"""Command line: pyconntrack probe|list|count|delete|create|demo.

Exit codes: 0 done, 1 some deletes failed, 2 invalid input (nothing touched),
3 permission denied, 4 unsupported by this kernel (5 other kernel errors).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional

from .conntrack import Conntrack, probe_capabilities
from .errors import (ConntrackError, InvalidFilter, KernelUnsupported, NamespaceNotFound,
                     PermissionDenied)
from .filter import Filter

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_PERM, EXIT_UNSUPPORTED, EXIT_ERROR = range(6)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: exit 2, one line
        sys.stderr.write(f"pyconntrack: error: {message}\n")
        raise SystemExit(EXIT_INVALID)


def _filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filter")
    g.add_argument("--netns", help="network namespace name (/var/run/netns) or path")
    g.add_argument("--zone", help="conntrack zone 0..65535 (its id, whatever its direction)")
    g.add_argument("--zone-dir", choices=["both", "orig", "reply"],
                   help="only entries whose zone is set for this direction (needs --zone)")
    g.add_argument("--orig-zone", metavar="Z",
                   help="zone Z set for the original direction only (= --zone Z --zone-dir orig)")
    g.add_argument("--reply-zone", metavar="Z",
                   help="zone Z set for the reply direction only (= --zone Z --zone-dir reply)")
    g.add_argument("--family", help="ipv4 or ipv6")
    g.add_argument("--proto", help="tcp udp icmp icmpv6 sctp gre udplite dccp or a number")
    g.add_argument("--src", help="original source IP or CIDR")
    g.add_argument("--dst", help="original destination IP or CIDR")
    g.add_argument("--addr", help="IP or CIDR on either side of the original tuple")
    g.add_argument("--reply-src", help="reply source IP or CIDR (NAT side)")
    g.add_argument("--reply-dst", help="reply destination IP or CIDR (NAT side)")
    g.add_argument("--sport", help="original source port P or range P-Q")
    g.add_argument("--dport", help="original destination port P or range P-Q")
    g.add_argument("--mark", help="mark V or V/MASK (decimal or 0x...)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")


def _int_arg(name: str, text: Optional[str]):
    if text is None:
        return None
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidFilter(f"--{name} must be an integer, not {text!r}") from None


def _zone_args(a: argparse.Namespace) -> tuple:
    """(zone, zone_dir) from --zone/--zone-dir or --orig-zone/--reply-zone."""
    given = [n for n in ("zone", "orig_zone", "reply_zone") if getattr(a, n) is not None]
    if len(given) > 1:
        raise InvalidFilter("give one of --zone, --orig-zone, --reply-zone")
    if a.orig_zone is not None or a.reply_zone is not None:
        if a.zone_dir is not None:
            raise InvalidFilter("--zone-dir goes with --zone, not --orig-zone/--reply-zone")
        if a.orig_zone is not None:
            return _int_arg("orig-zone", a.orig_zone), "orig"
        return _int_arg("reply-zone", a.reply_zone), "reply"
    return _int_arg("zone", a.zone), a.zone_dir


def _build_filter(a: argparse.Namespace) -> Filter:
    zone, zone_dir = _zone_args(a)
    return Filter(zone=zone, zone_dir=zone_dir, family=a.family, proto=a.proto,
                  src=a.src, dst=a.dst, addr=a.addr, reply_src=a.reply_src,
                  reply_dst=a.reply_dst, sport=a.sport, dport=a.dport, mark=a.mark)


def zone_text(zone: int, zone_dir: str) -> str:
    """zone=N, zone-orig=N or zone-reply=N, as conntrack-tools writes them."""
    return f"zone={zone}" if zone_dir == "both" else f"zone-{zone_dir}={zone}"


def _command_of(argv: Optional[List[str]]) -> Optional[str]:
    """The subcommand named in argv (the first word not starting with '-')."""
    for word in sys.argv[1:] if argv is None else argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; a plugin's module (bench, index) is imported only when it is
    the ``command`` run or no command is known (start-up time of the CLI)."""
    parser = _Parser(prog="pyconntrack", description="Zone-aware conntrack cleaner.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("probe", help="what this kernel's filters really do")
    p.add_argument("--refresh", action="store_true",
                   help="probe the kernel again and rewrite the per-boot cache")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("list", help="list matching entries")
    _filter_args(p)
    p = sub.add_parser("count", help="count matching entries")
    _filter_args(p)

    p = sub.add_parser("delete", help="delete matching entries")
    _filter_args(p)
    p.add_argument("--strategy", default="auto", choices=["auto", "flush", "walk", "index"])
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted")
    p.add_argument("--force", action="store_true",
                   help="allow a delete matching all of zone 0 (the host's connections)")

    p = sub.add_parser("create", help="create entries (tests, demos, benchmarks)")
    _filter_args(p)
    p.add_argument("--count", default="1", help="number of entries (sport counts up)")
    p.add_argument("--timeout", default="3600", help="seconds")

    for name, module in PLUGINS.items():
        if command is None or command == name:
            importlib.import_module(module).add_parser(sub, name)
        else:  # a stand-in: listed in --help, never parsed
            sub.add_parser(name, help=PLUGIN_HELP[name], add_help=False)

    p = sub.add_parser("demo", help="fill a scratch netns and clean zones every way")
    p.add_argument("--entries", type=int, default=200_000)
    p.add_argument("--zones", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    return parser


def _cmd_probe(a) -> int:
    from . import probe_cache
    caps = probe_capabilities(refresh=a.refresh)
    out = {**caps.to_dict(), "source": probe_cache.last["source"],
           "cache": probe_cache.last["cache"]}
    if a.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:<26} {value}")
    return EXIT_OK


def _cmd_list(a) -> int:
    f = _build_filter(a)
    with Conntrack(a.netns) as ct:
        for e in ct.dump(f):
            if a.json:
                print(json.dumps(e.to_dict()))
            else:
                ports = f" sport={e.sport} dport={e.dport}" if e.sport is not None else ""
                icmp = (f" type={e.icmp_type} code={e.icmp_code} id={e.icmp_id}"
                        if e.icmp_type is not None else "")
                print(f"{e.family} {e.proto_name} {zone_text(e.zone, e.zone_dir)} "
                      f"src={e.src} dst={e.dst}"
                      f"{ports}{icmp} reply-src={e.reply_src} reply-dst={e.reply_dst}"
                      f" mark={e.mark} id={e.id}")
    return EXIT_OK


def _cmd_count(a) -> int:
    with Conntrack(a.netns) as ct:
        n = ct.count(_build_filter(a))
    print(json.dumps({"count": n}) if a.json else n)
    return EXIT_OK


def _cmd_delete(a) -> int:
    f = _build_filter(a)
    with Conntrack(a.netns) as ct:
        r = ct.delete(f, strategy=a.strategy, dry_run=a.dry_run, allow_default_zone=a.force)
    if a.json:
        print(json.dumps(r.to_dict()))
    else:
        verb = "would delete" if a.dry_run else "deleted"
        print(f"{verb} {r.matched if a.dry_run else r.deleted} "
              f"(matched {r.matched}, already gone {r.already_gone}, failed {r.failed}) "
              f"strategy={r.strategy} walks={r.walks} in {r.elapsed_s * 1000:.1f} ms")
    if r.failed:
        sys.stderr.write(f"pyconntrack: {r.failed} deletes failed (first errno {r.errno})\n")
        return EXIT_FAILED
    return EXIT_OK


def _cmd_create(a) -> int:
    f = _build_filter(a)
    if f.addr is not None or f.mark is not None and f.mark[1] != 0xFFFFFFFF:
        raise InvalidFilter("create takes --src/--dst/--reply-src/--reply-dst addresses and a plain --mark")
    for name in ("src", "dst", "reply_src", "reply_dst"):
        net = getattr(f, name)
        if net is not None and net.num_addresses != 1:
            raise InvalidFilter(f"create needs a single address for --{name.replace('_', '-')}")
    if f.sport is not None and f.sport[0] != f.sport[1] or f.dport is not None and f.dport[0] != f.dport[1]:
        raise InvalidFilter("create takes single ports: --sport is the first source port")
    family = f"ipv{f.family}" if f.family else "ipv4"
    kwargs = {}
    for name in ("src", "dst", "reply_src", "reply_dst"):
        net = getattr(f, name)
        if net is not None:
            kwargs[name] = str(net.network_address)
    if f.sport is not None:
        kwargs["sport"] = f.sport[0]
    if f.dport is not None:
        kwargs["dport"] = f.dport[0]
    with Conntrack(a.netns) as ct:
        n = ct.create_many(_int_arg("count", a.count), zone=f.zone or 0,
                           zone_dir=f.zone_dir or "both", family=family,
                           proto=f.proto if f.proto is not None else "udp",
                           mark=f.mark[0] if f.mark else 0,
                           timeout=_int_arg("timeout", a.timeout), **kwargs)
    print(json.dumps({"created": n}) if a.json else f"created {n}")
    return EXIT_OK


def _cmd_demo(a) -> int:
    from .bench import demo
    if a.entries < 1 or a.zones < 15 or a.zones > 65535:
        raise InvalidFilter("demo needs --entries >= 1 and --zones between 15 and 65535")
    rows = demo.run(entries=a.entries, zones=a.zones)
    if a.json:
        print(json.dumps(rows))
    return EXIT_OK


# Subcommands living in their own modules: each has add_parser(sub, name)
# and run(args) -> exit code.
PLUGINS = {"bench": "pyconntrack.bench", "index": "pyconntrack.index_cli"}
PLUGIN_HELP = {"bench": "benchmark against peers and the kernel floor (scratch netns)",
               "index": "eBPF zone index: attach, detach, status, audit"}

COMMANDS = {"probe": _cmd_probe, "list": _cmd_list, "count": _cmd_count,
            "delete": _cmd_delete, "create": _cmd_create, "demo": _cmd_demo}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser(_command_of(argv)).parse_args(argv)
    try:
        if args.command in PLUGINS:
            return importlib.import_module(PLUGINS[args.command]).run(args)
        return COMMANDS[args.command](args)
    except InvalidFilter as exc:
        code, text = EXIT_INVALID, f"invalid input: {exc}"
    except PermissionDenied as exc:
        code, text = EXIT_PERM, str(exc)
    except KernelUnsupported as exc:
        code, text = EXIT_UNSUPPORTED, str(exc)
    except NamespaceNotFound as exc:
        code, text = EXIT_INVALID, str(exc)
    except ConntrackError as exc:
        code, text = EXIT_ERROR, str(exc)
    except PermissionError as exc:
        code, text = EXIT_PERM, f"permission denied: {exc}"
    except KeyboardInterrupt:
        code, text = 130, "interrupted"
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # anything else: still one line unless --debug
        if getattr(args, "debug", False):
            raise
        code, text = EXIT_ERROR, f"internal error: {type(exc).__name__}: {exc}"
    if getattr(args, "debug", False):
        import traceback
        traceback.print_exc()
    sys.stderr.write(f"pyconntrack: {text}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
