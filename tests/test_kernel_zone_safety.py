"""The danger the probe guards against, shown on the running kernel, and the
proof that a zone cleanup never touches other zones — on kernels that ignore
the zone in a flush (before 6.8) as on newer ones. Run on 6.1 and 6.12 by
``make vm-test``."""
import pytest

from pyconntrack import Conntrack, Filter, KernelUnsupported, probe_capabilities
from pyconntrack import _lowlevel as ll
from pyconntrack import probe_cache

from helpers import populate, table

pytestmark = pytest.mark.kernel


def test_raw_zone_flush_does_what_the_probe_says(ct):
    """Bypassing the plan, send the one-message zone flush in a scratch netns:
    where the probe found the zone ignored, it wipes every zone."""
    caps = probe_capabilities(refresh=True)
    assert probe_cache.last["source"] == "probe"  # proven now, not read from a cache
    populate(ct)
    assert {e.zone for e in ct.dump()} == {0, 1, 2, 65535}
    ll.flush(ct._h(), Filter(zone=1))
    left = {e.zone for e in ct.dump()}
    if caps.flush_zone:
        assert left == {0, 2, 65535}
    else:
        assert left == set(), "the probe said the zone is ignored: everything goes"


@pytest.mark.parametrize("zone", [1, 2, 65535])
def test_zone_cleanup_leaves_every_other_zone_intact(ct, zone):
    caps = ct.capabilities()
    populate(ct)
    before = table(ct)
    r = ct.delete(Filter(zone=zone))
    after = table(ct)
    assert set(after) == {k for k, e in before.items() if e.zone != zone}
    assert r.deleted == len(before) - len(after) and r.failed == 0
    if not caps.flush_zone:
        assert r.strategy == "walk"
        with pytest.raises(KernelUnsupported):
            ct.delete(Filter(zone=zone), strategy="flush")


def test_kernel_filters_off_gives_the_same_answers(netns):
    """Where the kernel has no zone dump filter, the C re-check alone is exact."""
    with Conntrack(netns) as ct:
        populate(ct)
        kernel = {z: ct.count(Filter(zone=z)) for z in (0, 1, 2, 65535, 9)}
    from pyconntrack import Capabilities
    with Conntrack(netns, capabilities=Capabilities(probed=True, zones=True)) as slow:
        assert {z: slow.count(Filter(zone=z)) for z in kernel} == kernel
