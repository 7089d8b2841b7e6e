"""Real-packet test traffic: two scratch network namespaces and a flow generator.

    client netns                      host netns
    ct0 10.200.0.1/24  ==== veth ==== ht0 10.200.0.2/24
        fd00:200::1/64                    fd00:200::2/64
    zone prefixes via 10.200.0.2          zone prefixes -> dev zsink (dummy or ifb: drops)
                                          nft: ct zone set <daddr map> at
                                               prerouting + output, priority raw

The client sends (``send``) to addresses of a zone's prefix; the host netns
forwards them to a sink device (dummy, or ifb without a qdisc) that drops them, so every packet passes
PRE_ROUTING (where the nft rule sets the zone before conntrack looks it up)
and POST_ROUTING (where conntrack confirms the new entry) and nothing ever
answers. ``send_local`` runs the generator inside the host netns: LOCAL_OUT,
then POST_ROUTING. Conntrack runs only in the host netns (the nft ``ct``
expression registers it there); the client netns has no conntrack hooks.

Both namespaces are created on entry and always removed on exit; no packet is
ever sent from, and no conntrack entry created in, the caller's namespace.

    with Topology(zones=[5, 6]) as topo:
        topo.send("udp", 4, 5, 2000)         # -> {"sent": 2000, "seconds": ..., ...}
        Conntrack(topo.host_netns).count(Filter(zone=5, proto="udp"))   # 2000
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import uuid
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .. import netns as _netns

# pyconntrack/testing/topology.py -> the repository (tools/ holds flowgen.c)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS_DIR = os.path.join(REPO_ROOT, "tools")
FLOWGEN = os.path.join(TOOLS_DIR, ".output", "flowgen")

LINK4 = ("10.200.0.1", "10.200.0.2", 24)          # client, host, prefix length
LINK6 = ("fd00:200::1", "fd00:200::2", 64)
CLIENT_IF, HOST_IF, SINK_IF = "ct0", "ht0", "zsink"
NFT_TABLE = "pct_topology"
PORTS_PER_ADDR = 60000      # at most this many ports/ids per destination address
PROTOS = ("tcp", "udp", "icmp")

ZonePrefixes = Union[Iterable[int], Mapping[int, Union[None, str, Tuple[Optional[str], Optional[str]]]]]


class TopologyError(RuntimeError):
    """Setting up the namespaces, or running flowgen, failed."""


def default_prefix(zone: int, family: int) -> str:
    """IPv4 10.201.Z.0/24 (zones 0..255), IPv6 fd00:201:Z::/64 (Z in hex, any zone)."""
    _check_zone(zone)
    if family == 4:
        if zone > 255:
            raise ValueError(f"zone {zone}: no default IPv4 prefix above zone 255; "
                             "pass zones={zone: ('a.b.c.d/len', None)}")
        return f"10.201.{zone}.0/24"
    if family == 6:
        return f"fd00:201:{zone:x}::/64"
    raise ValueError(f"family must be 4 or 6, not {family!r}")


def _check_zone(zone) -> None:
    if not isinstance(zone, int) or isinstance(zone, bool) or not 0 <= zone <= 65535:
        raise ValueError(f"zone must be an int in 0..65535, not {zone!r}")


def _family(family) -> int:
    if family in (4, "4", "ipv4", "inet"):
        return 4
    if family in (6, "6", "ipv6", "inet6"):
        return 6
    raise ValueError(f"family must be 4 or 6, not {family!r}")


def flowgen_path(build: bool = True) -> str:
    """The flowgen binary: $PYCONNTRACK_FLOWGEN, else tools/.output/flowgen,
    built (``make -C tools``) when missing or older than its source."""
    env = os.environ.get("PYCONNTRACK_FLOWGEN")
    if env:
        if not os.access(env, os.X_OK):
            raise TopologyError(f"PYCONNTRACK_FLOWGEN={env} is not an executable")
        return env
    src = os.path.join(TOOLS_DIR, "flowgen.c")
    stale = not os.path.exists(FLOWGEN) or (
        os.path.exists(src) and os.path.getmtime(src) > os.path.getmtime(FLOWGEN))
    if stale:
        if not build or not os.path.exists(src):
            raise TopologyError(f"flowgen not built: {FLOWGEN} (run make -C {TOOLS_DIR})")
        r = subprocess.run(["make", "-C", TOOLS_DIR], capture_output=True, text=True)
        if r.returncode or not os.access(FLOWGEN, os.X_OK):
            raise TopologyError(f"make -C {TOOLS_DIR} failed: {(r.stderr or r.stdout).strip()}")
    return FLOWGEN


def _run(argv: Sequence[str], what: str, input: Optional[str] = None) -> str:
    r = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if r.returncode:
        raise TopologyError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout


class Topology:
    """Two scratch netns ("client" and "host") joined by a veth pair, with
    per-zone destination prefixes routed client -> host -> a sink device
    (dummy, or ifb without a qdisc, both drop) and an
    nft ruleset in the host netns setting the conntrack zone by destination
    address at prerouting and output (priority raw).

    ``zones``: an iterable of zone numbers (default prefixes, see
    ``default_prefix``) or a mapping zone -> None | "cidr" | ("v4/len" or
    None, "v6/len" or None). A single CIDR replaces the default of its own
    family; None means the default (IPv4 has none above zone 255, so such a
    zone has no IPv4 prefix unless given). Prefixes must not overlap each
    other or the veth link (10.200.0.0/24, fd00:200::/64).
    """

    def __init__(self, zones: ZonePrefixes = (1,), *, name_prefix: str = "pct-topo",
                 flowgen: Optional[str] = None) -> None:
        self._prefixes: Dict[int, Dict[int, Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]] = {}
        items = zones.items() if isinstance(zones, Mapping) else ((z, None) for z in zones)
        for zone, spec in items:
            _check_zone(zone)
            v4, v6 = (spec, None) if spec is None or isinstance(spec, str) else spec
            if isinstance(v4, str) and ":" in v4:
                v4, v6 = None, v4
            p4 = v4 if v4 is not None else (default_prefix(zone, 4) if zone <= 255 else None)
            p6 = v6 if v6 is not None else default_prefix(zone, 6)
            self._prefixes[zone] = {}
            for fam, p in ((4, p4), (6, p6)):
                if p is None:
                    continue
                net = ipaddress.ip_network(p, strict=True)
                if net.version != fam:
                    raise ValueError(f"zone {zone}: {p} is not an IPv{fam} prefix")
                self._prefixes[zone][fam] = net
        if not self._prefixes:
            raise ValueError("Topology needs at least one zone")
        nets = [(z, n) for z, d in self._prefixes.items() for n in d.values()]
        nets += [(None, ipaddress.ip_network(f"{LINK4[0]}/{LINK4[2]}", strict=False)),
                 (None, ipaddress.ip_network(f"{LINK6[0]}/{LINK6[2]}", strict=False))]
        for i, (za, a) in enumerate(nets):
            for zb, b in nets[i + 1:]:
                if a.version == b.version and a.overlaps(b):
                    raise ValueError(f"prefixes overlap: {a} (zone {za}) and {b} (zone {zb})")
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._client = f"{name_prefix}-c-{tag}"
        self._host = f"{name_prefix}-h-{tag}"
        self._flowgen = flowgen
        self._up = False
        self.sink_kind: Optional[str] = None   # "dummy" or "ifb", once open

    # -- lifetime ----------------------------------------------------------
    def __enter__(self) -> "Topology":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Topology":
        if self._up:
            return self
        self._flowgen = self._flowgen or flowgen_path()
        try:
            _netns.create(self._client)
            _netns.create(self._host)
            self._up = True
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove both namespaces (their devices, routes, rules and conntrack
        entries go with them). Safe to call more than once."""
        errors = []
        for name in (self._client, self._host):
            try:
                _netns.remove(name)
            except Exception as e:   # remove the other one anyway
                errors.append(e)
        self._up = False
        if errors:
            raise errors[0]

    def _setup(self) -> None:
        c, h = self._client, self._host
        c4, h4, l4 = LINK4
        c6, h6, l6 = LINK6
        for ns in (c, h):
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                  "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                  "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
                  "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"],
                 f"sysctl in {ns}")
        _run(["ip", "netns", "exec", h, "sysctl", "-q", "-w",
              "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"], f"sysctl in {h}")
        # the veth is created inside the client netns, its peer directly in the host netns
        client_cmds = [
            "link set lo up",
            f"link add {CLIENT_IF} type veth peer name {HOST_IF} netns {h}",
            f"addr add {c4}/{l4} dev {CLIENT_IF}",
            f"addr add {c6}/{l6} dev {CLIENT_IF} nodad",
            f"link set {CLIENT_IF} up",
        ]
        host_cmds = [
            "link set lo up",
            f"addr add {h4}/{l4} dev {HOST_IF}",
            f"addr add {h6}/{l6} dev {HOST_IF} nodad",
            f"link set {HOST_IF} up",
            f"link set {SINK_IF} up",
        ]
        for zone, fams in sorted(self._prefixes.items()):
            for fam, net in sorted(fams.items()):
                gw = h4 if fam == 4 else h6
                client_cmds.append(f"route add {net} via {gw} dev {CLIENT_IF}")
                host_cmds.append(f"route add {net} dev {SINK_IF}")
        self._add_sink()
        _run(["ip", "-n", c, "-batch", "-"], f"ip -batch in {c}", input="\n".join(client_cmds) + "\n")
        _run(["ip", "-n", h, "-batch", "-"], f"ip -batch in {h}", input="\n".join(host_cmds) + "\n")
        _run(["ip", "netns", "exec", h, "nft", "-f", "-"], f"nft -f in {h}", input=self.nft_ruleset)

    def _add_sink(self) -> None:
        """A device that silently drops what is routed to it: dummy, or (kernels
        built without it) an ifb with no qdisc (ifb drops what tc did not
        redirect to it). Both are NOARP: no neighbour entry per destination."""
        h = self._host
        r = subprocess.run(["ip", "-n", h, "link", "add", SINK_IF, "type", "dummy"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            self.sink_kind = "dummy"
            return
        _run(["ip", "-n", h, "link", "add", SINK_IF, "type", "ifb"],
             f"no dummy ({r.stderr.strip()}) and no ifb device in {h}")
        _run(["ip", "netns", "exec", h, "tc", "qdisc", "replace", "dev", SINK_IF, "root", "noqueue"],
             f"tc qdisc noqueue on {SINK_IF}")
        self.sink_kind = "ifb"

    # -- description -------------------------------------------------------
    @property
    def host_netns(self) -> str:
        """Name of the netns whose conntrack table sees the traffic."""
        return self._host

    @property
    def client_netns(self) -> str:
        """Name of the netns ``send`` runs flowgen in (no conntrack there)."""
        return self._client

    @property
    def zones(self) -> Tuple[int, ...]:
        return tuple(sorted(self._prefixes))

    @property
    def flowgen(self) -> Optional[str]:
        return self._flowgen

    def zone_prefix(self, zone: int, family: Union[int, str] = 4) -> str:
        """The destination prefix (CIDR string) mapped to ``zone`` for ``family``."""
        fam = _family(family)
        try:
            return str(self._prefixes[zone][fam])
        except KeyError:
            raise ValueError(f"zone {zone} has no IPv{fam} prefix in this topology") from None

    def zone_addresses(self, zone: int, family: Union[int, str], count: int) -> List[str]:
        """The first ``count`` host addresses of the zone's prefix."""
        net = ipaddress.ip_network(self.zone_prefix(zone, family))
        out = []
        for a in net.hosts() if net.num_addresses > 2 else iter(net):
            if len(out) == count:
                break
            out.append(str(a))
        if len(out) < count:
            raise ValueError(f"zone {zone}: {net} has fewer than {count} addresses")
        return out

    def link_address(self, side: str, family: Union[int, str] = 4) -> str:
        """The veth address of "client" or "host"."""
        link = LINK4 if _family(family) == 4 else LINK6
        return {"client": link[0], "host": link[1]}[side]

    @property
    def nft_ruleset(self) -> str:
        """The ruleset loaded into the host netns."""
        maps = []
        for fam, sel in ((4, "ip daddr"), (6, "ip6 daddr")):
            elems = [f"{net} : {z}" for z, d in sorted(self._prefixes.items())
                     for f, net in d.items() if f == fam]
            if elems:
                maps.append(f"ct zone set {sel} map {{ {', '.join(elems)} }}")
        body = "".join(f"\t\t{m}\n" for m in maps)
        chains = "".join(
            f"\tchain {chain} {{\n\t\ttype filter hook {chain} priority raw; policy accept;\n"
            f"{body}\t}}\n" for chain in ("prerouting", "output"))
        return f"table inet {NFT_TABLE} {{\n{chains}}}\n"

    # -- traffic -----------------------------------------------------------
    def flowgen_argv(self, proto: str, family: Union[int, str], zone: int, flows: int, *,
                     rate: Optional[float] = None, duration: Optional[float] = None,
                     sport_base: Optional[int] = None, dport: Optional[int] = None,
                     batch: Optional[int] = None, ports: Optional[int] = None,
                     threads: Optional[int] = None, src: Optional[str] = None,
                     addresses: Optional[Sequence[str]] = None,
                     reuse: bool = False) -> List[str]:
        """The flowgen argument list ``send`` would run (without the netns part).
        ``reuse``: flows may exceed ports x addresses; the tuples are sent again
        (packets of established flows)."""
        if proto not in PROTOS:
            raise ValueError(f"proto must be one of {', '.join(PROTOS)}, not {proto!r}")
        fam = _family(family)
        if not isinstance(flows, int) or isinstance(flows, bool) or flows < 0:
            raise ValueError(f"flows must be a non-negative int, not {flows!r}")
        if ports is None:   # flowgen's default: min(60000, 65536 - base)
            base = {"udp": dport or 1024, "tcp": sport_base or 1024}.get(proto)
            ports = PORTS_PER_ADDR if base is None else min(PORTS_PER_ADDR, 65536 - base)
        if not isinstance(ports, int) or not 1 <= ports <= 65536:
            raise ValueError(f"ports must be in 1..65536, not {ports!r}")
        if addresses is None:
            addresses = self.zone_addresses(zone, fam, max(1, -(-flows // ports)))
        else:
            addresses = [str(ipaddress.ip_address(a)) for a in addresses]
        argv = [self._flowgen or flowgen_path(), "--proto", proto, "--family", str(fam),
                "--dst", ",".join(addresses), "--flows", str(flows), "--ports", str(ports)]
        for opt, val in (("--rate", rate), ("--duration", duration), ("--sport-base", sport_base),
                         ("--dport", dport), ("--batch", batch), ("--threads", threads),
                         ("--src", src)):
            if val is not None:
                argv += [opt, str(val)]
        if reuse:
            argv.append("--reuse")
        return argv

    def _flowgen_in(self, ns: str, argv: List[str], timeout: Optional[float]) -> dict:
        if not self._up:
            raise TopologyError("topology is not open")
        r = subprocess.run(["ip", "netns", "exec", ns] + argv, capture_output=True, text=True,
                           timeout=timeout)
        line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.returncode not in (0, 1) or not line:
            raise TopologyError(f"flowgen in {ns} failed ({r.returncode}): "
                                f"{(r.stderr or r.stdout).strip()}")
        try:
            result = json.loads(line)
        except ValueError:
            raise TopologyError(f"flowgen printed no JSON: {line!r}") from None
        if r.stderr.strip():
            result["stderr"] = r.stderr.strip()
        return result

    def send(self, proto: str, family: Union[int, str], zone: int, flows: int, *,
             timeout: Optional[float] = 600, **kw) -> dict:
        """Run flowgen in the client netns: ``flows`` new flows of ``proto``
        (tcp: SYNs, udp, icmp: echo requests) to the zone's prefix; returns its
        JSON {"sent", "seconds", "rate", "errors"} (+ "stderr" if any). The
        source is the client's veth address unless ``src`` says otherwise.
        Keywords: rate, duration, sport_base, dport, batch, ports, threads, src,
        addresses, reuse (see ``flowgen_argv``)."""
        kw.setdefault("src", self.link_address("client", family))
        return self._flowgen_in(self._client, self.flowgen_argv(proto, family, zone, flows, **kw),
                                timeout)

    def send_local(self, proto: str, family: Union[int, str], zone: int, flows: int, *,
                   timeout: Optional[float] = 600, **kw) -> dict:
        """Like ``send``, but from inside the host netns (LOCAL_OUT path); the
        source is the host's veth address unless ``src`` says otherwise."""
        kw.setdefault("src", self.link_address("host", family))
        return self._flowgen_in(self._host, self.flowgen_argv(proto, family, zone, flows, **kw),
                                timeout)

    # -- host conntrack table ------------------------------------------------
    def conntrack_count(self) -> int:
        """Entries in the host netns' conntrack table (no walk)."""
        from ..conntrack import Conntrack
        with Conntrack(self._host) as ct:
            return ct.table_count()

    def flush(self) -> None:
        """Empty the host netns' conntrack table (a scratch netns: every zone):
        ``conntrack -F`` (one message) when installed, else a pyconntrack walk."""
        if not self._up:
            raise TopologyError("topology is not open")
        if shutil.which("conntrack"):
            _run(["ip", "netns", "exec", self._host, "conntrack", "-F"], "conntrack -F")
            return
        from ..conntrack import Conntrack
        from ..filter import Filter
        with Conntrack(self._host) as ct:
            ct.delete(Filter(), allow_default_zone=True)
