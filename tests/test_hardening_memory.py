"""Memory: peak RSS of a process that counts, lists (streaming) and deletes a
large table; no growth over 1,000 repeated cleanups (Python allocator and
RSS); no leak in the C shim under valgrind (soak, and a short run here).

Short variant: 200k entries (the soak: 1M, with nf_conntrack_max raised and
restored)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import pytest

from pyconntrack import Conntrack, Filter
from pyconntrack import netns as scratch

pytestmark = pytest.mark.kernel

RSS_LIMIT_MB = 100
CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(name, **values):
    from soak.figures import record as rec
    rec(name, **values)


@contextlib.contextmanager
def conntrack_max_at_least(n: int):
    """Raise the global nf_conntrack_max if below n; restore what was found
    unless someone else changed it meanwhile (another benchmark may be
    raising it too)."""
    with open(CT_MAX) as f:
        found = int(f.read())
    if found >= n:
        yield found
        return
    with open(CT_MAX, "w") as f:
        f.write(str(n))
    try:
        yield n
    finally:
        with open(CT_MAX) as f:
            now = int(f.read())
        if now == n:
            with open(CT_MAX, "w") as f:
                f.write(str(found))


CHILD = textwrap.dedent("""
    import json, sys
    from pyconntrack import Conntrack, Filter

    def hwm():
        with open("/proc/self/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmHWM", "VmRSS"))}

    base = hwm()
    with Conntrack(sys.argv[1]) as ct:
        counted = ct.count()
        listed = sum(1 for _ in ct.dump())
        listed_zone = sum(1 for _ in ct.dump(Filter(zone=5)))
        r = ct.delete(Filter(zone=5), strategy="walk")
        left = ct.count()
    print(json.dumps({"base_hwm_kb": base["VmHWM"], "hwm_kb": hwm()["VmHWM"], "counted": counted,
                      "listed": listed, "listed_zone": listed_zone, "deleted": r.deleted,
                      "failed": r.failed, "left": left}))
""")


def peak_rss(entries: int) -> dict:
    with conntrack_max_at_least(entries + 50_000), scratch.scratch("pct-mem") as ns:
        with Conntrack(ns) as ct:
            other = entries // 10
            ct.create_many(entries - other, zone=5, proto="udp", src="10.5.0.1")
            ct.create_many(other, zone=6, proto="tcp", src="10.6.0.1")
            assert ct.table_count() == entries
        r = subprocess.run([sys.executable, "-c", CHILD, ns], capture_output=True, text=True,
                           timeout=1800)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    out["entries"] = entries
    out["hwm_mb"] = round(out["hwm_kb"] / 1024, 1)
    assert out["counted"] == out["listed"] == entries
    assert out["listed_zone"] == out["deleted"] == entries - entries // 10
    assert out["failed"] == 0 and out["left"] == entries // 10
    assert out["hwm_mb"] <= RSS_LIMIT_MB, out
    return out


def test_peak_rss_200k():
    out = peak_rss(200_000)
    record("peak RSS (short, 200k)", **out)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def repeated_cleanups(ct: Conntrack, n: int) -> dict:
    """n small cleanups (each: create 20, dump, delete given entries, delete by
    walk or flush, every tenth a count and a delete_many; table count); Python
    heap and RSS growth after a warm-up of 100."""
    def cycle(i):
        ct.create_many(20, zone=5, proto="udp", src="10.5.0.1", sport=1024 + i % 1000)
        entries = list(ct.dump(Filter(zone=5)))      # a new handle each time
        assert len(entries) == 20
        r = ct.delete_entries(entries[:5])
        assert r.deleted == 5
        if i % 10 == 0:
            assert ct.count(Filter(zone=5)) == 15
            r = ct.delete_many([Filter(zone=5), Filter(zone=7, proto="tcp")])
        else:
            r = ct.delete(Filter(zone=5), strategy="walk" if i % 2 else "auto")
        assert r.deleted == 15 and r.failed == 0
        assert ct.table_count() == 100

    ct.create_many(100, zone=6)
    for i in range(100):
        cycle(i)
    tracemalloc.start()
    try:
        rss0 = _rss_kb()
        snap0 = tracemalloc.take_snapshot()
        for i in range(n):
            cycle(i)
        snap1 = tracemalloc.take_snapshot()
        rss1 = _rss_kb()
    finally:
        tracemalloc.stop()
    stats = snap1.compare_to(snap0, "filename")
    growth = sum(s.size_diff for s in stats)
    top = [f"{s.traceback[0].filename.split('/')[-1]}:{s.size_diff}" for s in stats[:3]]
    return {"cycles": n, "py_heap_growth_bytes": growth, "rss_growth_kb": rss1 - rss0,
            "top_growth": top}


def test_no_growth_over_1000_cleanups(ct):
    out = repeated_cleanups(ct, 1000)
    record("repeated cleanups (1000)", **out)
    assert out["py_heap_growth_bytes"] < 64 * 1024, out
    assert out["rss_growth_kb"] < 8 * 1024, out


VALGRIND_SCRIPT = textwrap.dedent("""
    import sys
    from pyconntrack import Conntrack, Filter
    with Conntrack(sys.argv[1]) as ct:
        for i in range(int(sys.argv[2])):
            ct.create_many(300, zone=5, proto="udp", src="10.5.0.1")
            ct.create_many(30, zone=6, proto="icmp", src="10.6.0.1")
            ct.count(Filter(zone=5))
            es = list(ct.dump(Filter(zone=5)))
            ct.delete_entries(es[:50])
            ct.delete_entries(es[:50])           # already gone: error acks
            ct.delete(Filter(zone=5), strategy="walk")
            ct.delete_many([Filter(zone=6), Filter(zone=7), Filter(zone=8, proto="tcp"),
                            *[Filter(zone=z) for z in range(100, 110)]])
            ct.delete(Filter(zone=9))            # flush where proven
            ct.table_count()
""")

SHIM_FRAME = re.compile(r"\b(pct_\w+|cti_\w+|mnl_\w+|nfct_\w+|_pct\.abi3\.so|libmnl|"
                        r"libnetfilter_conntrack|libbpf|ct_index)")


def valgrind_leaks(loops: int) -> dict:
    """Run a few operations of every kind under valgrind (PYTHONMALLOC=malloc);
    "definitely lost" blocks whose stack has a frame of the shim, libmnl,
    libnetfilter_conntrack or libbpf are the shim's leaks (CPython's own
    are ignored)."""
    if not shutil.which("valgrind"):
        if os.environ.get("PYCONNTRACK_REQUIRE_KERNEL") == "1":  # CI: make deps installs it
            pytest.fail("valgrind not installed (make deps installs it)")
        pytest.skip("valgrind not installed")
    with scratch.scratch("pct-vg") as ns:
        env = dict(os.environ, PYTHONMALLOC="malloc")
        r = subprocess.run(["valgrind", "--leak-check=full", "--show-leak-kinds=definite",
                            "--num-callers=40", sys.executable, "-c", VALGRIND_SCRIPT, ns,
                            str(loops)], capture_output=True, text=True, env=env, timeout=1800,
                           cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr
    blocks = re.split(r"\n==\d+== \n", log)
    shim = [b for b in blocks if "definitely lost" in b and SHIM_FRAME.search(b)]
    shim_errors = [b for b in blocks if re.search(r"Invalid (read|write|free)|uninitialised|"
                                                  r"Mismatched free|overlap", b)
                   and SHIM_FRAME.search(b)
                   # valgrind does not model bpf(2)'s union attr: libbpf's own
                   # syscalls always show "uninitialised" fields there
                   and "Syscall param bpf(" not in b]
    summary = re.search(r"definitely lost: ([\d,]+) bytes in ([\d,]+) blocks", log)
    errors = re.search(r"ERROR SUMMARY: (\d+) errors", log)
    return {"loops": loops, "shim_definitely_lost_records": len(shim),
            "shim_leak_sample": shim[:2],
            "shim_memory_errors": len(shim_errors), "shim_error_sample": shim_errors[:2],
            "all_definitely_lost": summary.group(0) if summary else "none",
            "error_summary": errors.group(0) if errors else "?"}


def test_valgrind_shim_no_definite_leaks():
    out = valgrind_leaks(2)
    record("valgrind (short)", **out)
    assert out["shim_definitely_lost_records"] == 0, out["shim_leak_sample"]
    assert out["shim_memory_errors"] == 0, out["shim_error_sample"]
