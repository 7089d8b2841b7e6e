"""Fuzzing the CLI and the API against a real scratch-netns table.

Every generated CLI invocation runs in-process (``cli.main(argv)``) and every
API call on a ``Conntrack`` bound to the scratch netns; after each one the
kernel table is dumped and compared (tuple + zone + conntrack id):

- invalid input: exit 2 / InvalidFilter (or another typed ConntrackError),
  one line on stderr, no traceback, and the table unchanged;
- valid input: list/count/dry-run leave the table unchanged, a real delete
  removes exactly what the independent model says (then the table is refilled).

Short variant here (2,625 examples); the soak runs 21,000
(tests/soak/test_soak.py).
"""
from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import pyconntrack
from pyconntrack import Conntrack, ConntrackError, Entry, Filter, InvalidFilter, cli
from pyconntrack import conntrack, index_cli
from pyconntrack import netns as scratch
from pyconntrack.types import PROTO_NUMBERS

from helpers import populate
from model import key, model_match

pytestmark = pytest.mark.kernel

# examples per fuzzer for scale 1.0 (10,500 in all: about 50 s on the 2-core
# VM, too long for make test): make test runs SHORT_SCALE of it, the soak
# SOAK_SCALE times it (tests/soak/test_soak.py)
EXAMPLES = {"cli_invalid": 3000, "cli_soup": 2500, "filter_api": 3000, "conntrack_api": 2000}
SHORT_SCALE = 0.25
SOAK_SCALE = 2

SINGLE = [  # one-entry-per-row table: a delete's effect is easy to model
    (0, "ipv4", "tcp", "10.0.0.1", "192.0.2.1", 1000, 80, 0, None),
    (1, "ipv4", "udp", "10.0.1.2", "192.0.2.2", 2000, 53, 2, None),
    (1, "ipv4", "icmp", "10.0.0.3", "192.0.2.3", 3000, 0, 0, None),
    (1, "ipv6", "tcp", "fd00::2", "2001:db8::2", 4000, 22, 1, None),
    (2, "ipv4", "tcp", "10.0.0.1", "192.0.2.1", 1000, 80, 0, None),
    (7, "ipv6", "udp", "fd00::8", "2001:db8::80", 1100, 53, 0, "fd01::5"),
    (65535, "ipv4", "udp", "10.9.9.9", "192.0.2.9", 1200, 123, 0xFF00, None),
]


@pytest.mark.parametrize("text", ["²", "1" * 5000])
def test_proto_unicode_and_huge_digits_are_invalid(text):
    # found by this fuzzer: str.isdigit() accepts "²", int() refuses it
    with pytest.raises(InvalidFilter):
        Filter(proto=text)


def test_family_unhashable_is_invalid():
    # found by this fuzzer: a list reached a dict lookup (TypeError)
    with pytest.raises(InvalidFilter):
        Filter(family=["ipv4"])


class Env:
    """A scratch netns with a known table, and a guard that every Conntrack
    the CLI opens is bound to it (never the host's namespace)."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.ct = Conntrack(ns)
        self.refill()
        self.examples = 0
        self.checks = 0
        self.outcomes: dict = {}

    def refill(self) -> None:
        self.ct.delete(Filter(), allow_default_zone=True, strategy="walk")
        populate(self.ct, SINGLE, count=1)
        self.table = self.snapshot()

    def snapshot(self) -> dict:
        return {(key(e), e.id): e for e in self.ct.dump()}

    def note(self, what: str) -> None:
        self.examples += 1
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


@contextlib.contextmanager
def guarded_cli(ns: str):
    real = cli.Conntrack

    def checked(netns=None, **kw):
        if netns != ns:   # only names that cannot be opened may get through
            assert netns is not None, "fuzzed CLI tried the caller's own namespace"
            try:
                fd = conntrack._open_netns(conntrack.resolve_netns(netns), netns)
            except ConntrackError:
                pass
            else:
                os.close(fd)
                raise AssertionError(f"fuzzed CLI tried to open netns {netns!r}")
        return real(netns, **kw)

    cli.Conntrack = index_cli.Conntrack = checked
    try:
        yield
    finally:
        cli.Conntrack = index_cli.Conntrack = real


@pytest.fixture(scope="module")
def env():
    with scratch.scratch("pct-fuzz") as ns:
        e = Env(ns)
        try:
            with guarded_cli(ns):
                yield e
        finally:
            e.ct.close()


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:   # argparse (usage errors, --help)
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


FUZZ = dict(deadline=None, database=None, derandomize=False,
            suppress_health_check=list(HealthCheck))

# -- strategies -------------------------------------------------------------------

OPTIONS = ["--zone", "--family", "--proto", "--src", "--dst", "--addr", "--reply-src",
           "--reply-dst", "--sport", "--dport", "--mark"]
GOOD = {
    "--zone": ["0", "1", "2", "7", "65535", "3"],
    "--family": ["ipv4", "ipv6", "inet", "IPv6"],
    "--proto": ["tcp", "udp", "icmp", "icmpv6", "6", "17", "sctp"],
    "--src": ["10.0.0.1", "10.0.0.0/8", "fd00::2", "fd00::/16", "192.0.2.9"],
    "--dst": ["192.0.2.0/24", "2001:db8::/32", "192.0.2.1"],
    "--addr": ["10.0.0.1", "192.0.2.2", "fd00::8", "0.0.0.0/0"],
    "--reply-src": ["fd01::5", "192.0.2.1", "10.0.0.0/8"],
    "--reply-dst": ["10.0.0.1", "fd00::2"],
    "--sport": ["1000", "1000-2000", "0-65535", "3000"],
    "--dport": ["80", "1-100", "53", "22-23"],
    "--mark": ["0", "2", "0xff00/0xff00", "1/0x1"],
}


def _int_in(text, lo, hi) -> bool:
    try:
        return lo <= int(text, 10) <= hi
    except ValueError:
        return False


def _is_net(text) -> bool:
    try:
        ipaddress.ip_network(text.strip(), strict=True)
        return True
    except ValueError:
        return False


garbage = st.one_of(st.text(max_size=12), st.sampled_from(
    ["", " ", "-1", "65536", "1e3", "0x10", "1.5", "nan", "None", "10.0.0.1/33", "::/129",
     "10.0.0.1/8", "1.2.3", "fd00::1::2", "ipv5", "tcp6", "256", "9-1", "1-", "-",
     "70000-70001", "0x10/0x01", "4294967296", "-0x1", "\x00", "é", "١٢", "' ; rm -rf /",
     "$(reboot)", "`id`", "--zone", "%s%n", "\n"]))

INVALID = {  # a value that is certainly invalid for the option (oracle: Python itself)
    "--zone": garbage.filter(lambda s: not _int_in(s, 0, 65535)),
    "--family": garbage.filter(lambda s: s.strip().lower() not in ("ipv4", "ipv6", "inet", "inet6")),
    "--proto": st.one_of(st.integers(256, 10 ** 6).map(str), st.integers(-10 ** 6, -1).map(str),
                         st.text("abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=8)
                         .filter(lambda s: s.lower() not in PROTO_NUMBERS)),
    "--src": garbage.filter(lambda s: not _is_net(s)),
    "--dst": garbage.filter(lambda s: not _is_net(s)),
    "--addr": garbage.filter(lambda s: not _is_net(s)),
    "--reply-src": garbage.filter(lambda s: not _is_net(s)),
    "--reply-dst": garbage.filter(lambda s: not _is_net(s)),
    "--sport": st.sampled_from(["9-1", "70000", "-5", "1-2-3", "x", "", "65536-65537", "1.0"]),
    "--dport": st.sampled_from(["2-1", "65536", "a-b", " ", "0x50", "80/tcp"]),
    "--mark": st.sampled_from(["0x10/0x01", "4294967296", "-1", "x", "1/x", "/1", "3/1"]),
}

# whole-invocation mistakes (each must exit 2 and touch nothing)
STRUCTURAL = [
    ["delete", "--zone", "0"],                          # zone 0 without --force
    ["delete"],                                         # every zone without --force
    ["delete", "--proto", "tcp"],
    ["delete", "--zone", "1", "--strategy", "flush", "--src", "10.0.0.1"],
    ["delete", "--zone", "1", "--strategy", "bogus"],
    ["list", "--src", "10.0.0.1", "--dst", "fd00::1"],
    ["count", "--proto", "icmp", "--dport", "1"],
    ["count", "--family", "ipv6", "--proto", "icmp"],
    ["count", "--family", "ipv4", "--src", "fd00::1"],
    ["create", "--zone", "5", "--count", "-1"],
    ["create", "--zone", "5", "--src", "10.0.0.0/24"],
    ["create", "--zone", "5", "--addr", "10.0.0.1"],
    ["create", "--zone", "5", "--count", "x"],
    ["create", "--zone", "5", "--sport", "1-2"],
    ["list", "--bogus"], ["count", "extra"], ["nope"], [], ["delete", "--zone"],
    ["index", "explode"], ["index"],
]

BAD_NETNS = st.one_of(
    st.sampled_from(["", ".", "..", "a/b", "../../proc/1/ns/net", "x" * 300, " ", "-",
                     "/nonexistent/netns", "/etc/hostname", "/proc/self/ns/uts", "/dev/null",
                     "/", "pct-no-such-netns"]),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=30)
    .map(lambda s: "pct-nx-" + s))


@st.composite
def invalid_argv(draw):
    """A CLI invocation with at least one certainly invalid part."""
    kind = draw(st.sampled_from(["value", "value", "value", "structural", "netns"]))
    cmd = draw(st.sampled_from(["list", "count", "delete", "create"]))
    opts = draw(st.lists(st.sampled_from(OPTIONS), unique=True, max_size=4))
    argv = [cmd]
    for o in opts:
        argv += [o, draw(st.sampled_from(GOOD[o]))]
    if cmd == "delete" and draw(st.booleans()):
        argv += ["--json"]
    if kind == "value":
        o = draw(st.sampled_from(OPTIONS))
        argv += [f"{o}={draw(INVALID[o])}"]   # "--opt=value": values may start with "-"
        return argv + ["--netns", NS[0]]
    if kind == "structural":
        s = draw(st.sampled_from(STRUCTURAL))
        return s + (["--netns", NS[0]] if s and s[0] in ("list", "count", "delete", "create")
                    and s[-1] != "--zone" else [])
    bad = draw(BAD_NETNS)
    assume(bad in (".", "..") or "/" in bad
           or not os.path.exists(os.path.join("/var/run/netns", bad)))
    return argv + [f"--netns={bad}"]


NS = [""]   # the scratch netns name, set by the tests


DUMP_EVERY = 20   # a full kernel dump every N examples (and at every end);
# each example checks the namespace's entry count (a stats message: a dump
# walks the whole host-wide hash table, other namespaces' entries included)


def _check_table_unchanged(env, label):
    env.checks += 1
    if env.ct.table_count() == len(env.table) and env.checks % DUMP_EVERY:
        return
    now = env.snapshot()
    assert set(now) == set(env.table), f"{label}: table changed"


def fuzz_cli_invalid(env, n):
    NS[0] = env.ns

    @settings(max_examples=n, **FUZZ)
    @given(invalid_argv())
    def inner(argv):
        code, out, err = run_cli(argv)
        assert code == 2, (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert 1 <= len(lines) <= 3 and lines[-1].startswith("pyconntrack"), (argv, err)
        _check_table_unchanged(env, argv)
        env.note("exit-2")

    inner()


SOUP_TOKENS = st.one_of(
    st.sampled_from(OPTIONS + ["--json", "--dry-run", "--force", "--strategy", "walk", "auto",
                               "flush", "--debug", "--count", "--timeout", "-h", "--", "=",
                               "--zone=", "--proto=udp"]),
    st.sampled_from(sorted({v for vs in GOOD.values() for v in vs})),
    garbage,
)


@st.composite
def soup_argv(draw):
    cmd = draw(st.sampled_from(["list", "count", "delete", "delete", "delete", "create",
                                "probe", "index"]))
    tokens = draw(st.lists(SOUP_TOKENS, max_size=8))
    for t in tokens:   # nothing may redirect the command to another namespace
        assume(not (t.startswith("-") and t.lstrip("-")[:1] == "n"))
    if cmd == "create":   # keep valid creates small
        tokens = [t for t in tokens if t not in ("--count", "--timeout")] + ["--count", "2"]
    if cmd == "index":
        tokens = [draw(st.sampled_from(["status", "audit", "explode"]))] + tokens
    if cmd == "probe":
        return [cmd] + tokens
    return [cmd] + tokens + ["--netns", NS[0]]


def _expected_after_delete(env, argv):
    """What a successful real delete must leave (the model, not the code)."""
    ns = cli.build_parser().parse_args(argv)
    f = cli._build_filter(ns)
    return {k for k, e in env.table.items() if not model_match(f, e)}, ns


def fuzz_cli_soup(env, n):
    """Random token soups: whatever the outcome, no traceback, a typed exit
    code, and the table changes only as a successful delete/create says."""
    NS[0] = env.ns

    @settings(max_examples=n, **FUZZ)
    @given(soup_argv())
    def inner(argv):
        code, out, err = run_cli(argv)
        if "--debug" not in argv:
            assert "Traceback" not in err, (argv, err)
        assert "internal error" not in err, (argv, err)
        assert code in (0, 1, 2, 3, 4, 5), (argv, code)
        if code == 0 and argv[0] == "delete" and "-h" not in argv:
            expect, ns = _expected_after_delete(env, argv)
            now = env.snapshot()
            if ns.dry_run:
                assert set(now) == set(env.table), argv
            else:
                assert set(now) == expect, (argv, set(env.table) - set(now))
                if set(now) != set(env.table):
                    env.refill()
            env.note(f"delete-ok{'-dry' if ns.dry_run else ''}")
        elif code == 0 and argv[0] == "create" and "-h" not in argv:
            now = env.snapshot()
            assert set(env.table) <= set(now) and len(now) - len(env.table) == 2, argv
            env.refill()
            env.note("create-ok")
        else:
            _check_table_unchanged(env, argv)
            env.note(f"exit-{code}")

    inner()


# -- API ---------------------------------------------------------------------------

anything = st.deferred(lambda: st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-1, 70000),
    st.floats(allow_nan=True), st.text(max_size=10), st.binary(max_size=8),
    st.sampled_from(["tcp", "ipv4", "10.0.0.0/8", "fd00::1", "1-2", "0x1/0x1", "²", "7"]),
    st.tuples(st.integers(-2, 70000), st.integers(-2, 70000)),
    st.tuples(anything, anything), st.lists(st.integers(), max_size=3),
    st.sampled_from([ipaddress.ip_address("10.0.0.1"), ipaddress.ip_network("fd00::/8"),
                     object(), Filter(zone=1), {"zone": 1}, b"\x01", 1 + 2j])))

FIELDS = list(Filter.__slots__)


def fuzz_filter(env, n):
    @settings(max_examples=n, **FUZZ)
    @given(st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4))
    def inner(kwargs):
        try:
            f = Filter(**kwargs)
        except InvalidFilter:
            env.note("filter-invalid")
            return
        assert isinstance(f, Filter)
        assert Filter(**f.as_kwargs()) == f   # round trip
        env.note("filter-valid")

    inner()


def _garbage_entry(draw):
    base = Entry("ipv4", 17, 1, ipaddress.ip_address("10.9.9.9"),
                 ipaddress.ip_address("192.0.2.9"), 1, 2, ipaddress.ip_address("192.0.2.9"),
                 ipaddress.ip_address("10.9.9.9"), 2, 1, None, None, None, 0, 0, 0, None, 0)
    field = draw(st.sampled_from(["family", "proto", "zone", "src", "dst", "sport", "dport",
                                  "icmp_type", "icmp_id", "id"]))
    return base._replace(**{field: draw(anything)}), field


@st.composite
def api_call(draw):
    """(description, callable) of a Conntrack call with at least one bad argument."""
    which = draw(st.sampled_from(["count", "dump", "delete", "delete_many", "delete_each",
                                  "delete_entries", "create_many", "attach_index",
                                  "index_audit", "open"]))
    bad = draw(anything)
    if which == "count":
        assume(bad is not None and not isinstance(bad, Filter))
        return which, bad, lambda ct: ct.count(bad)
    if which == "dump":
        assume(bad is not None and not isinstance(bad, Filter))
        return which, bad, lambda ct: list(ct.dump(bad))
    if which == "delete":
        arg = draw(st.sampled_from(["filter", "strategy", "dry_run", "allow_default_zone"]))
        f = draw(st.sampled_from([Filter(zone=1), Filter(zone=7, proto="udp"), Filter()]))
        kw = {"filter": f, "strategy": "walk"}
        if arg == "filter":
            assume(not isinstance(bad, Filter))
        if arg == "strategy":
            assume(bad not in ("auto", "flush", "walk", "index"))
        if arg in ("dry_run", "allow_default_zone"):
            assume(not isinstance(bad, bool))
        kw[arg] = bad
        return f"delete({arg})", bad, lambda ct: ct.delete(**kw)
    if which in ("delete_many", "delete_each"):
        fs = draw(st.lists(st.sampled_from([Filter(zone=1), bad]), min_size=1, max_size=3))
        assume(any(not isinstance(x, Filter) for x in fs))
        return which, fs, lambda ct: getattr(ct, which)(fs)
    if which == "delete_entries":
        e, field = _garbage_entry(draw)
        return f"delete_entries({field})", e, lambda ct: ct.delete_entries([e])
    if which == "create_many":
        arg = draw(st.sampled_from(["count", "zone", "family", "proto", "src", "dst", "sport",
                                    "dport", "mark", "timeout", "reply_src"]))
        if arg == "count":   # never a valid (possibly huge) count
            assume(isinstance(bad, bool) or not isinstance(bad, int) or bad < 0 or bad > 2 ** 32)
        kw = {"count": 1, "zone": 9, arg: bad}
        return f"create_many({arg})", bad, lambda ct: ct.create_many(**kw)
    if which == "attach_index":
        assume(not (isinstance(bad, int) and not isinstance(bad, bool) and bad >= 0))
        return which, bad, lambda ct: ct.attach_index(max_records=bad)
    if which == "index_audit":
        return which, bad, lambda ct: ct.index_audit(bad)
    assume(bad is not None)   # None: the caller's own namespace
    assume(not isinstance(bad, str) or bad in (".", "..") or "/" in bad
           or not os.path.exists(os.path.join("/var/run/netns", bad)))
    assume(not (isinstance(bad, str) and bad.startswith("/proc")))
    return "open", bad, lambda ct: Conntrack(bad).close()


def fuzz_conntrack_api(env, n):
    @settings(max_examples=n, **FUZZ)
    @given(api_call())
    def inner(call):
        name, bad, fn = call
        try:
            fn(env.ct)
        except ConntrackError as exc:
            env.note(f"{name.split('(')[0]}:{type(exc).__name__}")
        else:
            if not name.startswith("create_many"):
                _check_table_unchanged(env, (name, bad))
                env.note(f"{name}:accepted")
                return
            now = env.snapshot()
            if set(now) != set(env.table):   # a create with valid values: refill
                assert name.startswith("create_many") and len(now) == len(env.table) + 1 \
                    and set(env.table) <= set(now), (name, bad)
                env.refill()
            env.note(f"{name.split('(')[0]}:accepted")
            return
        _check_table_unchanged(env, (name, bad))

    inner()


def run_all(env, scale=1):
    start = time.perf_counter()
    counts = {}
    for name, fn in (("cli_invalid", fuzz_cli_invalid), ("cli_soup", fuzz_cli_soup),
                     ("filter_api", fuzz_filter), ("conntrack_api", fuzz_conntrack_api)):
        before = env.examples
        fn(env, max(1, int(EXAMPLES[name] * scale)))
        counts[name] = env.examples - before
        assert set(env.snapshot()) == set(env.table), f"{name}: table changed"
    return counts, time.perf_counter() - start


def fuzz_and_record(env, scale, label):
    counts, seconds = run_all(env, scale)
    total = sum(counts.values())
    print(f"\nfuzz: {total} examples in {seconds:.1f} s {counts} {env.outcomes}")
    from soak.figures import record
    record(label, examples=total, seconds=round(seconds, 1), **counts,
           outcomes=dict(sorted(env.outcomes.items())))
    # the kernel table after everything: the known one
    assert set(env.snapshot()) == set(env.table)
    return total


def test_fuzz_cli_and_api(env):
    total = fuzz_and_record(env, SHORT_SCALE, "fuzz (short)")
    assert total >= 2500
