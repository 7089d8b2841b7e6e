"""Open vSwitch's kernel datapath creates conntrack entries (ct(commit,zone=N))
without crossing netfilter hooks: the eBPF index must detect it and fall back,
leaving nothing of the zone, and ``audit`` must list exactly those entries.

Real OVS (ovsdb-server + ovs-vswitchd started inside a scratch namespace),
a bridge on the kernel datapath, real packets between two more scratch
namespaces. Needs openvswitch-switch and the openvswitch module: the qemu
6.12 guest of ``make vm-test`` has both and sets PYCONNTRACK_REQUIRE_OVS=1,
so there it fails instead of skipping."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from pyconntrack import Conntrack, Filter
from pyconntrack import index as index_mod

pytestmark = pytest.mark.kernel

REQUIRE_OVS = os.environ.get("PYCONNTRACK_REQUIRE_OVS") == "1"
OVS_CTL = "/usr/share/openvswitch/scripts/ovs-ctl"
ZONE = 4242
CLI = [sys.executable, "-m", "pyconntrack"]


def _ovs_missing() -> str:
    # checks without side effects first: loading openvswitch.ko changes the
    # machine (seen on 6.1: new namespaces then track connections)
    if not os.path.exists(OVS_CTL) or not shutil.which("ovs-vsctl"):
        return "openvswitch-switch is not installed"
    ok, _, reason = index_mod.availability()
    if not ok:
        return f"eBPF zone index unavailable: {reason}"
    if subprocess.run(["pgrep", "-x", "ovs-vswitchd"], capture_output=True).returncode == 0:
        return "an Open vSwitch already runs on this machine: not touching it"
    if subprocess.run(["modprobe", "openvswitch"], capture_output=True).returncode:
        return "no openvswitch kernel module"
    return ""


def _ovs_log() -> str:
    out = []
    for name in ("ovs-vswitchd.log", "ovsdb-server.log"):
        try:
            with open(f"/var/log/openvswitch/{name}") as f:
                out.append(f"{name}: " + " | ".join(f.read().splitlines()[-8:]))
        except OSError:
            pass
    return "; ".join(out)


def run(*argv, check=True, timeout=90):
    # files, not pipes: the daemons ovs-ctl starts must not keep a pipe of
    # ours open (a pipe would make us wait for them forever)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            r = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(argv)} timed out; {_ovs_log()}") from None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if check and r.returncode:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {stderr.strip()}; "
                             f"{_ovs_log()}")
    return stdout


@pytest.fixture
def ovs():
    module_loaded = os.path.exists("/sys/module/openvswitch")
    missing = _ovs_missing()
    if missing:
        if REQUIRE_OVS:
            pytest.fail(f"PYCONNTRACK_REQUIRE_OVS=1 but: {missing}")
        pytest.skip(missing)
    tag = uuid.uuid4().hex[:6]
    ns, c1, c2 = f"pct-ovs-{tag}", f"pct-ovc1-{tag}", f"pct-ovc2-{tag}"
    for n in (ns, c1, c2):
        run("ip", "netns", "add", n)
    started = False
    try:
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        run("ip", "netns", "exec", ns, OVS_CTL, "start", "--system-id=random", "--no-mlockall")
        started = True
        vs = ["ip", "netns", "exec", ns, "ovs-vsctl", "--timeout=30"]
        run(*vs, "add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=system")
        for i, peer in ((1, c1), (2, c2)):
            run("ip", "-n", ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                "netns", peer)
            run("ip", "-n", ns, "link", "set", f"v{i}", "up")
            run(*vs, "add-port", "br0", f"v{i}")
            run("ip", "-n", peer, "addr", "add", f"10.9.0.{i}/24", "dev", "eth0")
            run("ip", "-n", peer, "link", "set", "eth0", "up")
            run("ip", "-n", peer, "link", "set", "lo", "up")
        of = ["ip", "netns", "exec", ns, "ovs-ofctl"]
        run(*of, "del-flows", "br0")
        for flow in (f"table=0,priority=10,ip,ct_state=-trk,actions=ct(table=1,zone={ZONE})",
                     f"table=1,priority=10,ip,ct_state=+trk+new,actions=ct(commit,zone={ZONE}),"
                     "NORMAL",
                     "table=1,priority=10,ip,ct_state=+trk+est,actions=NORMAL",
                     "table=1,priority=1,ip,actions=NORMAL",
                     "table=0,priority=1,actions=NORMAL"):
            run(*of, "add-flow", "br0", flow)
        yield ns, c1, c2
    finally:
        if started:
            run("ip", "netns", "exec", ns, "ovs-vsctl", "--timeout=30", "--if-exists", "del-br",
                "br0", check=False)
            run("ip", "netns", "exec", ns, OVS_CTL, "stop", check=False)
        for n in (c1, c2, ns):
            run("ip", "netns", "del", n, check=False)
        if not module_loaded:   # leave the machine as we found it
            subprocess.run(["modprobe", "-r", "openvswitch"], capture_output=True)


SENDER = """
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[2])):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"x", ("10.9.0.2", port))
    u.close()
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.settimeout(0.2)
    try:
        t.connect(("10.9.0.2", port))
    except OSError:
        pass
    t.close()
"""


def _traffic(c1, first, last):
    run("ip", "netns", "exec", c1, "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.9.0.2")
    run("ip", "netns", "exec", c1, sys.executable, "-c", SENDER, str(first), str(last))


def test_ovs_entries_leave_nothing_behind(ovs):
    ns, c1, _ = ovs
    with Conntrack(ns) as ct:
        try:
            ct.attach_index()
            _traffic(c1, 5000, 5012)
            made = ct.count(Filter(zone=ZONE))
            assert made >= 12, f"OVS made only {made} entries in zone {ZONE}"
            status = ct.index_status()
            assert "Open vSwitch" in status["blind_spot"]
            assert status["zones"].get(ZONE, {"records": 0})["records"] == 0  # hooks saw none
            audit = ct.index_audit()
            assert audit["missing"] == ct.table_count() == made   # exactly OVS's entries
            assert {e.zone for e in audit["entries"]} == {ZONE}
            res = ct.delete(Filter(zone=ZONE))
            assert res.strategy != "index" and "Open vSwitch" in res.reason, res
            assert res.deleted == made and ct.count(Filter(zone=ZONE)) == 0
            assert ct.index_audit()["missing"] == 0
            # the CLI, auto strategy, after more traffic
            _traffic(c1, 6000, 6012)
            r = subprocess.run([*CLI, "delete", "--netns", ns, "--zone", str(ZONE), "--json"],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            assert out["strategy"] != "index" and "Open vSwitch" in out["reason"], out
            assert ct.count(Filter(zone=ZONE)) == 0
        finally:
            ct.detach_index()
