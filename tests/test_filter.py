"""Filter validation (unit + property tests) and the C matcher against the
independent model, on synthetic entries (no kernel needed)."""
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from pyconntrack import Filter, InvalidFilter
from pyconntrack import _lowlevel as ll
from pyconntrack.types import Entry

from model import model_match


# --- validation ---------------------------------------------------------------

@pytest.mark.parametrize("zone", [True, False, 1.0, "1", None.__class__, -1, 65536, [1]])
def test_zone_rejects_non_int_or_out_of_range(zone):
    with pytest.raises(InvalidFilter):
        Filter(zone=zone)


@pytest.mark.parametrize("zone", [0, 1, 65535])
def test_zone_accepts_bounds(zone):
    assert Filter(zone=zone).zone == zone


def test_fields_parse():
    f = Filter(zone=7, family="IPv4", proto="TCP", src="10.0.0.0/8", dst="192.0.2.1",
               reply_src="172.16.0.0/12", sport="1000-2000", dport=443, mark="0x10/0xf0")
    assert f.family == 4 and f.proto == 6 and f.sport == (1000, 2000) and f.dport == (443, 443)
    assert f.mark == (0x10, 0xF0)
    assert f.dst == ipaddress.ip_network("192.0.2.1/32")


@pytest.mark.parametrize("kwargs", [
    {"family": "ipx"}, {"family": True}, {"proto": "tcpx"}, {"proto": 256}, {"proto": True},
    {"src": "10.0.0.1/8"}, {"src": "300.1.1.1"}, {"src": 5}, {"dst": "fe80::1/129"},
    {"sport": "2-1"}, {"sport": 70000}, {"dport": "a-b"}, {"dport": (1, 2, 3)}, {"sport": True},
    {"mark": "0x10/0x0f"}, {"mark": -1}, {"mark": 1 << 32}, {"mark": (1, 1 << 33)},
    {"src": "10.0.0.1", "dst": "fd00::1"}, {"family": "ipv6", "src": "10.0.0.1"},
    {"proto": "icmp", "dport": 1}, {"proto": "icmpv6", "family": "ipv4"},
])
def test_invalid_inputs_rejected(kwargs):
    with pytest.raises(InvalidFilter):
        Filter(**kwargs)


def test_immutable_and_hashable():
    f = Filter(zone=1)
    with pytest.raises(AttributeError):
        f.zone = 2
    assert f == Filter(zone=1) and hash(f) == hash(Filter(zone=1))
    assert f.replace(zone=2).zone == 2 and f.zone == 1


def test_address_sets_family():
    assert Filter(src="fd00::/8").family == 6
    assert Filter(addr="10.1.2.3").family == 4


def test_default_zone_guard_semantics():
    assert Filter().is_broad_on_default_zone()
    assert Filter(zone=0).is_broad_on_default_zone()
    assert Filter(zone=0, proto="tcp").is_broad_on_default_zone()
    assert not Filter(zone=0, src="10.0.0.1").is_broad_on_default_zone()
    assert not Filter(zone=5).is_broad_on_default_zone()


def test_zone_flushable():
    assert Filter(zone=5).is_zone_flushable()
    assert Filter(zone=5, family="ipv6", mark=3).is_zone_flushable()
    assert not Filter(zone=5, proto="udp").is_zone_flushable()
    assert not Filter(family="ipv4").is_zone_flushable()


# --- property tests ---------------------------------------------------------------

@given(st.integers())
def test_zone_property(z):
    if 0 <= z <= 65535:
        assert Filter(zone=z).zone == z
    else:
        with pytest.raises(InvalidFilter):
            Filter(zone=z)


@given(st.integers(), st.integers())
def test_port_range_property(lo, hi):
    if 0 <= lo <= hi <= 65535:
        assert Filter(sport=f"{lo}-{hi}").sport == (lo, hi)
    else:
        with pytest.raises(InvalidFilter):
            Filter(sport=(lo, hi))


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(), st.booleans()))
def test_arbitrary_values_never_crash(value):
    for field in ("zone", "family", "proto", "src", "sport", "mark"):
        try:
            Filter(**{field: value})
        except InvalidFilter:
            pass


V4_POOL = ["10.0.0.1", "10.0.0.2", "10.0.1.7", "192.0.2.9"]
V6_POOL = ["fd00::1", "fd00::2", "fd00:0:0:1::7", "2001:db8::9"]
V4_NETS = ["10.0.0.0/8", "10.0.0.0/24", "10.0.0.1/32", "192.0.2.0/24", "0.0.0.0/0"]
V6_NETS = ["fd00::/8", "fd00::/64", "fd00::1/128", "2001:db8::/32", "::/0"]


@st.composite
def entries(draw):
    fam = draw(st.sampled_from([4, 6]))
    pool = V4_POOL if fam == 4 else V6_POOL
    proto = draw(st.sampled_from([6, 17, 132] + ([1] if fam == 4 else [58])))
    ports = proto not in (1, 58)
    a = lambda: ipaddress.ip_address(draw(st.sampled_from(pool)))  # noqa: E731
    zone = draw(st.sampled_from([0, 1, 65535]))
    zone_dir = draw(st.sampled_from(["both", "orig", "reply"])) if zone else "both"
    return Entry(family=f"ipv{fam}", proto=proto, zone=zone, zone_dir=zone_dir,
                 src=a(), dst=a(), sport=draw(st.integers(0, 65535)) if ports else None,
                 dport=draw(st.sampled_from([22, 53, 80, 443])) if ports else None,
                 reply_src=a(), reply_dst=a(), reply_sport=None, reply_dport=None,
                 icmp_type=None, icmp_code=None, icmp_id=None,
                 mark=draw(st.sampled_from([0, 1, 0x10, 0xFFFFFFFF])), status=0, timeout=0,
                 tcp_state=None, id=0)


@st.composite
def filters(draw):
    fam = draw(st.sampled_from([None, 4, 6]))
    nets = V4_NETS if fam == 4 else V6_NETS
    kw = {}
    if draw(st.booleans()):
        kw["zone"] = draw(st.sampled_from([0, 1, 65535]))
        if kw["zone"] and draw(st.integers(0, 3)) == 0:
            kw["zone_dir"] = draw(st.sampled_from(["both", "orig", "reply"]))
    if fam is not None:
        kw["family"] = f"ipv{fam}"
        for field in ("src", "dst", "addr", "reply_src", "reply_dst"):
            if draw(st.integers(0, 3)) == 0:
                kw[field] = draw(st.sampled_from(nets))
    if draw(st.booleans()):
        kw["proto"] = draw(st.sampled_from([6, 17, 132]))
        if draw(st.booleans()):
            lo = draw(st.integers(0, 65535))
            kw["sport"] = (lo, draw(st.integers(lo, 65535)))
        if draw(st.booleans()):
            kw["dport"] = draw(st.sampled_from([53, (0, 100), (443, 443)]))
    if draw(st.booleans()):
        kw["mark"] = draw(st.sampled_from([1, (0x10, 0xF0), (0, 0)]))
    return Filter(**kw)


@settings(max_examples=500)
@given(filters(), entries())
def test_c_matcher_equals_model(f, e):
    fields = {"family": 4 if e.family == "ipv4" else 6, "proto": e.proto, "zone": e.zone,
              "zone_dir": e.zone_dir,
              "mark": e.mark, "orig_src": str(e.src), "orig_dst": str(e.dst),
              "reply_src": str(e.reply_src), "reply_dst": str(e.reply_dst),
              "sport": e.sport, "dport": e.dport}
    assert ll.c_match(f, fields) == model_match(f, e)


# -- zones per direction, normalisation and the zone-0 guard -------------------------

def test_zone_dir_validation():
    assert Filter(zone=5, zone_dir="orig").zone_dir == "orig"
    assert Filter(zone=5, zone_dir="original").zone_dir == "orig"
    for bad in ({"zone_dir": "orig"}, {"zone": 0, "zone_dir": "reply"},
                {"zone": 5, "zone_dir": "sideways"}, {"zone": 5, "zone_dir": 1}):
        with pytest.raises(InvalidFilter):
            Filter(**bad)
    assert not Filter(zone=5, zone_dir="both").is_zone_flushable()  # a flush ignores direction


@pytest.mark.parametrize("text", ["1/", "1/ ", "/", "0x10/"])
def test_mark_with_empty_mask_is_invalid(text):
    with pytest.raises(InvalidFilter):
        Filter(mark=text)


@pytest.mark.parametrize("kw, expected", [
    ({"src": "0.0.0.0/0"}, Filter(family="ipv4")),
    ({"addr": "::/0"}, Filter(family="ipv6")),
    ({"zone": 3, "reply_dst": "0.0.0.0/0", "dst": "10.0.0.0/8"}, Filter(zone=3, dst="10.0.0.0/8")),
    ({"mark": "0/0"}, Filter()),
    ({"mark": (0, 0), "zone": 7}, Filter(zone=7)),
])
def test_narrow_nothing_fields_are_normalised(kw, expected):
    f = Filter(**kw)
    assert f == expected and f.describe() == expected.describe()


# The guard, as a property: a filter on zone 0 (or on every zone) is refused
# without consent exactly when it cannot exclude an entry of a protocol and
# family it selects. Both directions are checked with the C matcher.

def _zone0_entry(f, fam, proto, rnd, ports=True):
    pool = ["10.0.0.1", "192.0.2.9", "172.16.3.4"] if fam == 4 else ["fd00::1", "2001:db8::9"]
    pick = lambda: rnd.choice(pool)  # noqa: E731
    fields = {"family": fam, "proto": proto, "zone": 0, "mark": rnd.choice([0, 1, 0xFFFFFFFF]),
              "orig_src": pick(), "orig_dst": pick(), "reply_src": pick(), "reply_dst": pick()}
    if ports and proto not in (1, 58):
        fields["sport"], fields["dport"] = rnd.randrange(65536), rnd.randrange(65536)
    return fields


def _witness(f, fam, proto):
    """An entry of zone 0 the filter excludes, built from the field that narrows."""
    base = _zone0_entry(f, fam, proto, __import__("random").Random(0))
    base.update(sport=1000, dport=1000)
    for name, key in (("src", "orig_src"), ("dst", "orig_dst"), ("reply_src", "reply_src"),
                      ("reply_dst", "reply_dst"), ("addr", None)):
        net = getattr(f, name)
        if net is None:
            continue
        outside = net.network_address + (1 << (net.max_prefixlen - net.prefixlen)) \
            if int(net.broadcast_address) < (2 ** net.max_prefixlen - 1) else net.network_address - 1
        for k in ([key] if key else ["orig_src", "orig_dst"]):
            base[k] = str(outside)
        return base
    for name in ("sport", "dport"):
        rng = getattr(f, name)
        if rng is not None and rng != (0, 65535):
            base[name] = rng[0] - 1 if rng[0] > 0 else rng[1] + 1
            return base
    if f.mark is not None:
        value, mask = f.mark
        base["mark"] = value ^ (mask & -mask)   # flip the lowest bit the mask checks
        return base
    raise AssertionError(f"no narrowing field in {f!r}")


@settings(max_examples=400)
@given(filters(), st.randoms(use_true_random=False))
def test_guard_refuses_exactly_what_cannot_exclude(f, rnd):
    if f.zone not in (None, 0):
        assert not f.is_broad_on_default_zone()
        return
    fam = f.family or rnd.choice([4, 6])
    proto = f.proto if f.proto is not None else rnd.choice([6, 17, 132, 1 if fam == 4 else 58])
    if f.is_broad_on_default_zone():
        has_ports = f.sport is not None or f.dport is not None
        for _ in range(20):   # every zone-0 entry of that family and protocol matches
            if has_ports and proto in (1, 58):
                proto = 6
            assert ll.c_match(f, _zone0_entry(f, fam, proto, rnd))
    else:
        if f.proto is None and (f.sport is not None or f.dport is not None):
            proto = 6
        assert not ll.c_match(f, _witness(f, fam, proto))


@pytest.mark.parametrize("kw", [
    {"mark": "0/0"}, {"src": "0.0.0.0/0"}, {"addr": "::/0"}, {"zone": 0, "sport": "0-65535"},
    {"zone": 0, "src": "0.0.0.0/0"}, {"zone": 0, "mark": "0x0/0x0", "dport": (0, 65535)},
    {"reply_dst": "::/0", "proto": "udp"},
])
def test_narrow_nothing_filters_are_broad(kw):
    assert Filter(**kw).is_broad_on_default_zone()
