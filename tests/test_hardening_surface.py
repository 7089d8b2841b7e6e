"""Privilege and attack surface: no shell anywhere, every subprocess gets an
argv list, the C code runs no commands, pinned BPF objects are root-only.

Covered elsewhere: non-root / no CAP_NET_ADMIN gives exit 3 and one line
(test_cli.py::test_permission_denied_exit_3), the pin directory is 0700
(test_kernel_index.py::test_detach_and_reattach)."""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sorted(glob.glob(os.path.join(REPO, "pyconntrack", "*.py")))
C = sorted(glob.glob(os.path.join(REPO, "csrc", "*.c")) + glob.glob(os.path.join(REPO, "bpf", "*.c"))
           + glob.glob(os.path.join(REPO, "tools", "*.c")))

SUBPROCESS_FUNCS = {"run", "Popen", "call", "check_call", "check_output", "getoutput",
                    "getstatusoutput"}


def _argv_ok(node: ast.AST) -> bool:
    """An argv list: a list/tuple display, list(...), or list + list."""
    if isinstance(node, (ast.List, ast.Tuple, ast.ListComp)):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list":
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return bool(_argv_ok(node.left) or _argv_ok(node.right))
    if isinstance(node, ast.Name):   # a variable: must be assigned a list in the same function
        return None
    return False


def audit(path: str) -> list:
    tree = ast.parse(open(path).read(), path)
    problems = []
    assigned = {}
    for node in ast.walk(tree):   # parameters typed as a list of strings are argv lists
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs:
                if a.annotation is not None and re.match(
                        r"^(List|Sequence|list|typing\.List)\[str\]$", ast.unparse(a.annotation)):
                    assigned.setdefault(a.arg, []).append(ast.List(elts=[], ctx=ast.Load()))
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    assigned.setdefault(t.id, []).append(node.value)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        where = f"{os.path.basename(path)}:{node.lineno}"
        if owner == "os" and (name in ("system", "popen") or name.startswith(("exec", "spawn"))):
            problems.append(f"{where}: os.{name}")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                problems.append(f"{where}: shell={ast.unparse(kw.value)}")
        if owner == "subprocess" and name in SUBPROCESS_FUNCS:
            if name in ("getoutput", "getstatusoutput"):
                problems.append(f"{where}: subprocess.{name} runs a shell")
                continue
            argv = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "args"), None)
            ok = _argv_ok(argv) if argv is not None else False
            if ok is None:
                ok = all(_argv_ok(v) for v in assigned.get(argv.id, [])) and argv.id in assigned
            if not ok:
                problems.append(f"{where}: subprocess.{name}({ast.unparse(argv)}) is not an argv list")
    return problems


def test_no_shell_command_built_from_input():
    problems = [p for path in PY for p in audit(path)]
    assert not problems, problems
    calls = sum(open(p).read().count("subprocess.") for p in PY)
    assert calls > 0   # the audit did look at something


def test_audit_catches_shell_patterns(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\n"
                   "def f(x):\n"
                   "    os.system('ip netns del ' + x)\n"
                   "    subprocess.run('ip netns del ' + x, shell=True)\n"
                   "    subprocess.run(f'conntrack -D -w {x}')\n"
                   "    cmd = 'ls ' + x\n"
                   "    subprocess.Popen(cmd)\n"
                   "    subprocess.getoutput(x)\n")
    assert len(audit(str(bad))) == 6, audit(str(bad))


def test_c_code_runs_no_commands():
    pattern = re.compile(r"\b(system|popen|execl|execlp|execle|execv|execvp|execvpe|posix_spawnp?)\s*\(")
    hits = []
    for path in C:
        for i, line in enumerate(open(path), 1):
            code = line.split("//")[0]
            if pattern.search(code) and not code.lstrip().startswith(("*", "/*")):
                hits.append(f"{os.path.basename(path)}:{i}: {line.strip()}")
    assert not hits, hits


@pytest.mark.kernel
def test_pinned_bpf_objects_root_only():
    """Every pinned map and link under /sys/fs/bpf/pyconntrack is reachable
    only by root: the directories are 0700 root-owned, and user nobody can
    neither list the pins nor open one."""
    from pyconntrack import Conntrack, index as index_mod
    from pyconntrack.testing.topology import Topology
    ok, _, reason = index_mod.availability()
    if not ok:
        pytest.skip(reason)
    with Topology(zones=[5]) as topo:
        with Conntrack(topo.host_netns) as ct:
            r = ct.attach_index()
            try:
                for d in (index_mod.PIN_ROOT, r.pin_dir):
                    st = os.stat(d)
                    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700, (d, oct(st.st_mode))
                pins = os.listdir(r.pin_dir)
                assert set(index_mod.LINK_PINS) <= set(pins)
                target = os.path.join(r.pin_dir, pins[0])
                nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
                for argv in (["ls", r.pin_dir], ["ls", index_mod.PIN_ROOT], ["cat", target]):
                    p = subprocess.run(nobody + argv, capture_output=True, text=True)
                    assert p.returncode != 0 and "ermission denied" in p.stderr, (argv, p)
            finally:
                ct.detach_index()
