"""The long hardening runs (make soak: pytest -m soak). Same checks as the
short variants in tests/test_hardening_*.py, at scale; figures are printed at
the end of the run and kept in build/reliability-figures.json."""
from __future__ import annotations

import os

import pytest

from pyconntrack import Filter

import test_hardening_churn as churn
import test_hardening_faults as faults
import test_hardening_memory as memory
from test_hardening_fuzz import SOAK_SCALE, env, fuzz_and_record  # noqa: F401 (fixture)
from soak.figures import record

pytestmark = [pytest.mark.soak, pytest.mark.kernel]

CHURN_S = int(os.environ.get("PYCONNTRACK_SOAK_CHURN_S", "180"))


def test_soak_fuzz_21000(env):  # noqa: F811
    assert fuzz_and_record(env, SOAK_SCALE, "fuzz (soak)") >= 20000


@pytest.mark.parametrize("use_index,duration", [(False, CHURN_S), (True, CHURN_S * 2 // 3)],
                         ids=["walk-flush", "index"])
def test_soak_churn(use_index, duration):
    fig = churn.run_churn(duration, use_index)
    record(f"churn (soak, {'index' if use_index else 'walk/flush'})", **fig)
    assert fig["survivors"] == 0 and fig["cycles"] >= 10


def test_soak_peak_rss_1m():
    record("peak RSS (soak, 1M)", **memory.peak_rss(1_000_000))


def test_soak_repeated_cleanups_5000(ct):
    out = memory.repeated_cleanups(ct, 5000)
    record("repeated cleanups (soak, 5000)", **out)
    assert out["py_heap_growth_bytes"] < 64 * 1024, out
    assert out["rss_growth_kb"] < 8 * 1024, out


def test_soak_valgrind():
    out = memory.valgrind_leaks(20)
    record("valgrind (soak)", **out)
    assert out["shim_definitely_lost_records"] == 0, out["shim_leak_sample"]
    assert out["shim_memory_errors"] == 0, out["shim_error_sample"]


@pytest.mark.skipif(not os.access(faults.HASHSIZE, os.W_OK), reason="hashsize not writable")
def test_soak_resize_during_walk(ct):
    lib = faults.resize_during_walk(ct, 200_000, rounds=6)
    raw = faults.resize_during_walk(ct, 200_000, rounds=4, raw=True)
    record("resize during walk (soak)", library=lib, raw_single_walk=raw,
           raw_survivors=[r["left_in_zone"] for r in raw])
    assert all(r["left_in_zone"] == 0 for r in lib)
    assert ct.count(Filter()) == 0
