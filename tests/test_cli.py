"""The CLI against a scratch netns, checked with conntrack-tools; exit codes
and one-line errors."""
import json
import shutil
import subprocess
import sys

import pytest

from pyconntrack import DeleteResult, cli

from helpers import populate

CLI = [sys.executable, "-m", "pyconntrack"]


def run(*args, env=None, prefix=()):
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def conntrack_tools(netns, *args):
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", *args],
                         capture_output=True, text=True, check=True).stdout
    rows = set()
    for line in out.splitlines():
        kv = {}
        for tok in line.split():
            k, sep, v = tok.partition("=")
            if sep and k not in kv:
                kv[k] = v
        if "srckey" in kv:  # GRE keys live where ports do
            kv["sport"], kv["dport"] = str(int(kv["srckey"], 16)), str(int(kv["dstkey"], 16))
        if kv.get("sport") == kv.get("dport") == "0":  # portless generic protocol
            kv.pop("sport"), kv.pop("dport")
        if "src" in kv:
            rows.add((kv["src"], kv["dst"], kv.get("sport"), kv.get("dport"),
                      kv.get("type"), kv.get("id"), int(kv.get("zone", 0))))
    return rows


def cli_rows(lines):
    rows = set()
    for line in lines:
        d = json.loads(line)
        text = [None if d[k] is None else str(d[k])
                for k in ("sport", "dport", "icmp_type", "icmp_id")]
        rows.add((d["src"], d["dst"], *text, d["zone"]))
    return rows


needs_conntrack = pytest.mark.skipif(not shutil.which("conntrack"),
                                     reason="conntrack-tools not installed")


@pytest.mark.kernel
@needs_conntrack
def test_list_matches_conntrack_tools(ct, netns):
    populate(ct)
    r = run("list", "--netns", netns, "--json")
    assert r.returncode == 0, r.stderr
    assert cli_rows(r.stdout.splitlines()) == conntrack_tools(netns, "-L")
    r = run("list", "--netns", netns, "--json", "--zone", "1", "--proto", "tcp")
    assert cli_rows(r.stdout.splitlines()) == conntrack_tools(netns, "-L", "-w", "1", "-p", "tcp")


@pytest.mark.kernel
@needs_conntrack
@pytest.mark.parametrize("strategy", ["auto", "walk"])
def test_delete_json_and_conntrack_tools_agree(ct, netns, strategy):
    populate(ct)
    before = conntrack_tools(netns, "-L")
    zone1 = conntrack_tools(netns, "-L", "-w", "1")
    r = run("delete", "--netns", netns, "--zone", "1", "--json", "--strategy", strategy)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result) >= {"matched", "deleted", "already_gone", "failed", "errno", "strategy",
                           "walks", "elapsed_s"}
    assert result["deleted"] == len(zone1) and result["failed"] == 0
    assert conntrack_tools(netns, "-L") == before - zone1


@pytest.mark.kernel
def test_count_and_dry_run(ct, netns):
    populate(ct)
    r = run("count", "--netns", netns, "--zone", "65535", "--json")
    assert json.loads(r.stdout) == {"count": 6}
    r = run("delete", "--netns", netns, "--zone", "65535", "--dry-run", "--json")
    assert json.loads(r.stdout)["matched"] == 6
    assert ct.table_count() == len(list(ct.dump()))
    r = run("count", "--netns", netns, "--zone", "65535")
    assert r.stdout.strip() == "6"


@pytest.mark.kernel
def test_create_subcommand(netns):
    r = run("create", "--netns", netns, "--zone", "12", "--proto", "tcp", "--src", "10.1.1.1",
            "--dst", "10.2.2.2", "--dport", "8080", "--count", "25", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"created": 25}
    r = run("count", "--netns", netns, "--zone", "12", "--dport", "8080")
    assert r.stdout.strip() == "25"


@pytest.mark.kernel
def test_zone0_needs_force(ct, netns):
    populate(ct)
    r = run("delete", "--netns", netns, "--zone", "0")
    assert r.returncode == 2 and "zone 0" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("delete", "--netns", netns, "--zone", "0", "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"] == 6


@pytest.mark.kernel
def test_unsupported_forced_flush_exit_4(netns):
    import os
    env = dict(os.environ, PYCONNTRACK_DISABLE="flush_zone")
    r = run("delete", "--netns", netns, "--zone", "5", "--strategy", "flush", env=env)
    assert r.returncode == 4, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.kernel
def test_missing_netns(tmp_path):
    r = run("list", "--netns", "pct-does-not-exist")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["drop-cap-net-admin", "non-root"])
def test_permission_denied_exit_3(ct, netns, how, nobody_cli):
    populate(ct)
    for args in (("count",), ("delete", "--zone", "1"), ("list",)):
        if how == "drop-cap-net-admin":
            r = run(*args, "--netns", netns,
                    prefix=("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"))
        else:
            r = nobody_cli(*args, "--netns", netns)
        assert r.returncode == 3, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "CAP_NET_ADMIN" in r.stderr
    assert ct.count() == ct.table_count() and ct.table_count() > 0  # untouched


@pytest.mark.kernel
def test_permission_denied_api(netns):
    code = ("import pyconntrack,sys\n"
            "try:\n"
            f"    pyconntrack.Conntrack({netns!r}).count()\n"
            "except pyconntrack.PermissionDenied as e:\n"
            "    assert isinstance(e, PermissionError) and e.errno == 1, e\n"
            "    sys.exit(0)\n"
            "sys.exit(9)\n")
    r = subprocess.run(["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--",
                        sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args", [
    ["delete", "--zone", "70000"], ["delete", "--zone", "abc"], ["list", "--src", "1.2.3"],
    ["count", "--sport", "9-1"], ["delete", "--zone", "1", "--strategy", "nope"],
    ["list", "--family", "ipv5"], ["count", "--mark", "0x10/0x01"],
    ["list", "--src", "10.0.0.1", "--dst", "fd00::1"], ["bogus"], [],
    ["delete", "--zone", "1", "--strategy", "flush", "--src", "10.0.0.1"],
])
def test_invalid_input_exit_2_one_line(args):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("pyconntrack")]) >= 1


def test_failed_deletes_exit_1(monkeypatch, capsys):
    class Fake:
        def __init__(self, netns):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def delete(self, f, **kw):
            return DeleteResult(3, 2, 0, 1, 16, "walk", 1, 0.01, "")

    monkeypatch.setattr(cli, "Conntrack", Fake)
    assert cli.main(["delete", "--zone", "3", "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["failed"] == 1 and "errno 16" in err


# -- zones per direction and the zone-0 guard, as a new user meets them -------------

def _insert(netns, *args):
    subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-I", "--timeout", "300", *args],
                   capture_output=True, text=True, check=True)


def _directional_table(netns):
    """Made with conntrack-tools, as the issue's reporter did."""
    base = ["-p", "udp", "-s", "10.0.0.1", "-d", "10.0.0.2", "--dport", "6"]
    _insert(netns, *base, "--sport", "1", "--orig-zone", "6")
    _insert(netns, *base, "--sport", "2", "--orig-zone", "6")
    _insert(netns, *base, "--sport", "3", "--reply-zone", "7")
    _insert(netns, *base, "--sport", "4", "--zone", "8")
    _insert(netns, *base, "--sport", "5")


def _lines(netns):
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L"],
                         capture_output=True, text=True, check=True).stdout
    # without the countdown (third column): the table, not the clock
    return sorted(" ".join(line.split()[:2] + line.split()[3:]) for line in out.splitlines())


@pytest.mark.kernel
@needs_conntrack
@pytest.mark.parametrize("args, gone", [
    (["--zone", "6", "--addr", "10.0.0.2"], {"sport=1", "sport=2"}),
    (["--zone", "6"], {"sport=1", "sport=2"}),
    (["--zone", "6", "--strategy", "walk"], {"sport=1", "sport=2"}),
    (["--zone", "7", "--dport", "6"], {"sport=3"}),
    (["--zone", "7"], {"sport=3"}),
    (["--reply-zone", "7"], {"sport=3"}),
    (["--orig-zone", "6", "--sport", "2"], {"sport=2"}),
    (["--zone", "0", "--src", "10.0.0.1"], {"sport=5"}),
])
def test_directional_zones_delete_exactly(netns, args, gone):
    _directional_table(netns)
    before = _lines(netns)
    count = run("count", "--netns", netns, *[a for a in args if a not in ("--strategy", "walk")])
    assert count.returncode == 0 and int(count.stdout) == len(gone), count
    r = run("delete", "--netns", netns, "--json", *args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["deleted"] == len(gone)
    left = _lines(netns)
    assert left == [line for line in before if not any(f"{g} " in line for g in gone)]


@pytest.mark.kernel
@needs_conntrack
def test_list_shows_zone_direction(netns):
    _directional_table(netns)
    r = run("list", "--netns", netns, "--zone", "7")
    assert r.returncode == 0 and "zone-reply=7" in r.stdout and r.stdout.count("\n") == 1
    r = run("list", "--netns", netns, "--zone", "6", "--json")
    assert {json.loads(line)["zone_dir"] for line in r.stdout.splitlines()} == {"orig"}


@pytest.mark.kernel
@needs_conntrack
@pytest.mark.parametrize("args", [
    ["--mark", "0/0"], ["--src", "0.0.0.0/0"], ["--addr", "::/0"],
    ["--zone", "0", "--sport", "0-65535"], ["--zone", "0", "--src", "0.0.0.0/0"],
    ["--mark", "1/"], ["--family", "ipv4", "--dport", "0-65535"],
])
def test_narrow_nothing_deletes_exit_2_untouched(netns, args):
    _directional_table(netns)
    before = _lines(netns)
    r = run("delete", "--netns", netns, *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1
    assert _lines(netns) == before
