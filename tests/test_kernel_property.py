"""Property test against the kernel: random tables x random filters; the set
deleted equals the independent model's, checked by a kernel dump afterwards."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyconntrack import Capabilities, Conntrack, Filter

from helpers import refill, table
from model import model_match

pytestmark = pytest.mark.kernel

ZONES = [0, 1, 2, 65535]
V4 = ["10.0.0.1", "10.0.0.2", "10.0.1.1", "192.0.2.1"]
V6 = ["fd00::1", "fd00::2", "fd00:0:0:1::1", "2001:db8::1"]
V4_NETS = ["10.0.0.0/8", "10.0.0.0/24", "10.0.0.2/32", "192.0.2.0/24", "10.0.1.0/24"]
V6_NETS = ["fd00::/8", "fd00::/64", "fd00::2/128", "2001:db8::/32", "fd00:0:0:1::/64"]


@st.composite
def rows(draw):
    fam = draw(st.sampled_from(["ipv4", "ipv6"]))
    pool = V4 if fam == "ipv4" else V6
    proto = draw(st.sampled_from(["tcp", "udp", "sctp", "icmp" if fam == "ipv4" else "icmpv6"]))
    nat = draw(st.booleans())
    return dict(zone=draw(st.sampled_from(ZONES)), family=fam, proto=proto,
                src=draw(st.sampled_from(pool)), dst=draw(st.sampled_from(pool)),
                sport=draw(st.sampled_from([1000, 2000, 40000])),
                dport=draw(st.sampled_from([22, 53, 443])),
                mark=draw(st.sampled_from([0, 1, 0x10])),
                reply_src=draw(st.sampled_from(pool)) if nat else None,
                count=draw(st.integers(1, 4)))


@st.composite
def filters(draw):
    kw = {}
    fam = draw(st.sampled_from([None, "ipv4", "ipv6"]))
    if draw(st.booleans()):
        kw["zone"] = draw(st.sampled_from(ZONES))
    if fam:
        kw["family"] = fam
        nets = V4_NETS if fam == "ipv4" else V6_NETS
        for field in ("src", "dst", "addr", "reply_src"):
            if draw(st.integers(0, 3)) == 0:
                kw[field] = draw(st.sampled_from(nets))
    if draw(st.booleans()):
        kw["proto"] = draw(st.sampled_from(["tcp", "udp", "sctp"]))
        if draw(st.booleans()):
            kw["sport"] = draw(st.sampled_from([1000, (1000, 2001), (1001, 39999)]))
        if draw(st.booleans()):
            kw["dport"] = draw(st.sampled_from([53, (0, 100)]))
    if draw(st.integers(0, 3)) == 0:
        kw["mark"] = draw(st.sampled_from([1, (0x10, 0xF0), (0, 0xFF)]))
    return Filter(**kw)


@pytest.mark.parametrize("fallback", [False, True], ids=["probed", "fallback"])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(table_rows=st.lists(rows(), min_size=1, max_size=12), fs=st.lists(filters(), min_size=1,
                                                                          max_size=3))
def test_deleted_set_equals_model(netns, fallback, table_rows, fs):
    caps = Capabilities(probed=True, zones=True) if fallback else None
    with Conntrack(netns, capabilities=caps) as ct:
        refill(ct, table_rows)
        before = table(ct)
        if len(fs) == 1:
            result = ct.delete(fs[0], allow_default_zone=True)
        else:
            result = ct.delete_many(fs, allow_default_zone=True)
        gone = {k for k, e in before.items() if any(model_match(f, e) for f in fs)}
        assert set(table(ct)) == set(before) - gone
        assert result.deleted == len(gone) and result.failed == 0
