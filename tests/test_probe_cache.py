"""The per-boot cache of the capability probe: keyed by boot, kernel and
pyconntrack build, never trusted when it could have been tampered with, and
PYCONNTRACK_DISABLE still applied on top. Needs root (ownership checks);
the probe itself is a counting stand-in except where marked."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import pyconntrack
from pyconntrack import Capabilities, probe_cache
from pyconntrack import conntrack as conntrack_mod

pytestmark = pytest.mark.kernel  # root: the cache trusts root-owned files only

BOOT_A = "0f0e0d0c-0b0a-4909-8807-060504030201"
BOOT_B = "11111111-2222-4333-8444-555555555555"
VERDICT = Capabilities(probed=True, zones=True, dump_zone=True, flush_zone=True,
                       flush_family=True, dump_mark=True, dump_filter_v4=True,
                       netfilter_bpf=True, zoned_kfuncs=True, kernel="9.9.9-test")


class Prober:
    """A stand-in for the kernel probe that counts its calls."""

    def __init__(self, caps=VERDICT):
        self.caps = caps
        self.calls = 0
        self.index_calls = 0

    def probe(self):
        self.calls += 1
        return self.caps

    def index(self):
        self.index_calls += 1
        return False, False, "re-checked"

    def get(self, store, refresh=False):
        return probe_cache.capabilities(self.probe, self.index, refresh=refresh, store=store,
                                        use_env=False)


@pytest.fixture
def store(tmp_path):
    d = tmp_path / "cache"
    boot = tmp_path / "boot_id"
    boot.write_text(BOOT_A + "\n")
    os.chmod(tmp_path, 0o755)
    return probe_cache.Store(directory=str(d), boot_id_path=str(boot), release="9.9.9-test",
                             kernel_version="#1 test")


def test_probe_once_then_read(store):
    p = Prober()
    assert p.get(store) == VERDICT and p.calls == 1
    assert probe_cache.last["source"] == "probe" and "written" in probe_cache.last["cache"]
    st = os.stat(store.path)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o644
    assert os.stat(store.directory).st_mode & 0o777 == 0o755
    assert [n for n in os.listdir(store.directory)] == [probe_cache.FILE_NAME]  # no temp left
    assert p.get(store) == VERDICT and p.calls == 1
    assert probe_cache.last["source"] == "cache"
    assert p.get(store, refresh=True) == VERDICT and p.calls == 2


@pytest.mark.parametrize("change", ["boot_id", "release", "kernel_version", "version",
                                    "shim", "fields"])
def test_key_mismatch_probes_again(store, monkeypatch, change):
    p = Prober()
    p.get(store)
    if change == "boot_id":
        with open(store.boot_id_path, "w") as f:
            f.write(BOOT_B + "\n")
    elif change == "release":
        store.release = "9.9.10-test"
        p.caps = dataclasses.replace(VERDICT, kernel="9.9.10-test")
    elif change == "kernel_version":
        store.kernel_version = "#2 test"
    elif change == "version":
        monkeypatch.setattr(pyconntrack, "__version__", "99.0")
    elif change == "shim":
        monkeypatch.setattr(probe_cache, "_shim_digest", "0" * 64)
    else:
        monkeypatch.setattr(probe_cache, "_fields_signature", lambda: "probed:bool")
    p.get(store)
    assert p.calls == 2, probe_cache.last
    assert "stale" in probe_cache.last["cache"]
    p.get(store)  # rewritten under the new key
    assert p.calls == 2


def test_unreadable_boot_id_means_no_cache(store):
    os.unlink(store.boot_id_path)
    p = Prober()
    p.get(store)
    p.get(store)
    assert p.calls == 2
    assert not os.path.exists(store.path)


def _valid_file(store):
    Prober().get(store)
    with open(store.path, "rb") as f:
        return f.read()


def _rewrite(store, data: bytes):
    os.unlink(store.path)
    fd = os.open(store.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)


def test_symlink_is_refused_and_not_followed(store, tmp_path):
    good = _valid_file(store)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(good)
    os.unlink(store.path)
    os.symlink(elsewhere, store.path)
    p = Prober()
    p.get(store)
    assert p.calls == 1 and "symlink" in probe_cache.last["cache"]
    # the rewrite replaced the link itself, never wrote through it
    assert not os.path.islink(store.path)
    assert elsewhere.read_bytes() == good


def test_symlinked_directory_is_refused(store, tmp_path):
    _valid_file(store)
    real = tmp_path / "real"
    os.rename(store.directory, real)
    os.symlink(real, store.directory)
    p = Prober()
    p.get(store)
    assert p.calls == 1 and "symlink" in probe_cache.last["cache"]
    assert "not written" in probe_cache.last["cache"]


@pytest.mark.parametrize("tamper", ["owner", "group_owner_only", "mode_666", "mode_664",
                                    "mode_755", "setuid", "hardlink", "dir_mode", "dir_750",
                                    "dir_owner", "fifo"])
def test_untrusted_file_is_ignored(store, tmp_path, tamper):
    _valid_file(store)
    if tamper == "owner":
        os.chown(store.path, 65534, 0)
    elif tamper == "group_owner_only":   # root user, other group, group-writable
        os.chown(store.path, 0, 65534)
        os.chmod(store.path, 0o664)
    elif tamper == "mode_666":
        os.chmod(store.path, 0o666)
    elif tamper == "mode_664":
        os.chmod(store.path, 0o664)
    elif tamper == "mode_755":
        os.chmod(store.path, 0o755)
    elif tamper == "setuid":
        os.chmod(store.path, 0o4644)
    elif tamper == "dir_750":
        os.chmod(store.directory, 0o750)
    elif tamper == "hardlink":
        os.link(store.path, tmp_path / "second-name")
    elif tamper == "dir_mode":
        os.chmod(store.directory, 0o777)
    elif tamper == "dir_owner":
        os.chown(store.directory, 65534, 65534)
    else:
        os.unlink(store.path)
        os.mkfifo(store.path, 0o644)
    p = Prober()
    p.get(store)
    assert p.calls == 1, probe_cache.last
    assert probe_cache.last["source"] == "probe"
    assert "ignored" in probe_cache.last["cache"]


def test_world_writable_ancestor_is_refused(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)   # not sticky: anyone could swap the cache directory
    os.chmod(tmp_path, 0o755)
    boot = tmp_path / "boot_id"
    boot.write_text(BOOT_A)
    s = probe_cache.Store(directory=str(parent / "cache"), boot_id_path=str(boot),
                          release="9.9.9-test", kernel_version="#1 test")
    p = Prober()
    p.get(s)
    p.get(s)
    assert p.calls == 2
    assert not os.path.exists(s.path)


def _edit(doc, how):
    if how == "extra_key":
        doc["extra"] = 1
    elif how == "missing_field":
        del doc["capabilities"]["flush_zone"]
    elif how == "extra_field":
        doc["capabilities"]["flush_everything"] = True
    elif how == "int_for_bool":
        doc["capabilities"]["flush_zone"] = 1
    elif how == "str_for_bool":
        doc["capabilities"]["flush_zone"] = "true"
    elif how == "unprobed":
        doc["capabilities"]["probed"] = False
    elif how == "probe_error":
        doc["capabilities"]["probe_error"] = "EPERM"
    elif how == "kernel":
        doc["capabilities"]["kernel"] = "1.0"
    elif how == "capeff":
        doc["capeff"] = "-1"
    elif how == "key_type":
        doc["key"]["format"] = True
    elif how == "not_object":
        return json.dumps([doc]).encode()
    return json.dumps(doc).encode()


CORRUPTIONS = ["truncated", "garbage", "nan", "utf16", "too_big", "extra_key",
               "missing_field", "extra_field", "int_for_bool", "str_for_bool", "unprobed",
               "probe_error", "kernel", "capeff", "key_type", "not_object"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_cache_is_ignored_and_rewritten(store, how):
    good = _valid_file(store)
    doc = json.loads(good)
    if how == "truncated":
        data = good[: len(good) // 2]
    elif how == "garbage":
        data = b"\x00\xff" * 10
    elif how == "nan":
        data = good.replace(b'"capeff": "', b'"nan": NaN, "capeff": "')
    elif how == "utf16":
        data = good.decode().encode("utf-16")
    elif how == "too_big":
        data = good + b" " * probe_cache.MAX_BYTES
    else:
        data = _edit(doc, how)
    _rewrite(store, data)
    p = Prober()
    assert p.get(store) == VERDICT
    assert p.calls == 1, f"{how}: trusted a corrupt cache"
    assert probe_cache.last["source"] == "probe"
    with open(store.path, "rb") as f:
        assert json.loads(f.read()) == json.loads(good)  # a valid verdict again


def test_incomplete_probe_is_not_cached(store):
    p = Prober(Capabilities(probed=False, probe_error="EPERM"))
    p.get(store)
    p.get(store)
    assert p.calls == 2 and not os.path.exists(store.path)


def test_non_root_does_not_write(store, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    p = Prober()
    p.get(store)
    assert "not root" in probe_cache.last["cache"]
    assert not os.path.exists(store.path)


def test_other_privileges_recheck_the_index(store, monkeypatch):
    p = Prober()
    p.get(store)
    monkeypatch.setattr(probe_cache, "capeff", lambda: 0)  # e.g. a process without CAP_BPF
    caps = p.get(store)
    assert p.calls == 1 and p.index_calls == 1
    assert not caps.netfilter_bpf and caps.index_error == "re-checked"
    assert caps.flush_zone  # the kernel's filter verdict is the same for everyone


def test_env_setting():
    assert probe_cache.store_from_env({}) == probe_cache.Store()
    assert probe_cache.store_from_env({"PYCONNTRACK_PROBE_CACHE": "1"}) == probe_cache.Store()
    for off in ("0", "off", "no", "false", "maybe"):
        assert probe_cache.store_from_env({"PYCONNTRACK_PROBE_CACHE": off}) is None
    assert probe_cache.store_from_env({"PYCONNTRACK_PROBE_CACHE": "/x/y"}).directory == "/x/y"


def test_disable_env_applies_on_top_of_a_cached_verdict(tmp_path, monkeypatch):
    """A verdict read from the cache (real key of this boot) is lowered by
    PYCONNTRACK_DISABLE, never stored lowered."""
    os.chmod(tmp_path, 0o755)
    d = str(tmp_path / "cache")
    s = probe_cache.Store(directory=d)
    real = dataclasses.replace(VERDICT, kernel=os.uname().release)
    assert probe_cache.save(s, real) == "written"
    monkeypatch.setenv("PYCONNTRACK_PROBE_CACHE", d)
    monkeypatch.setenv("PYCONNTRACK_DISABLE", "dump_zone,flush_zone")
    monkeypatch.setattr(conntrack_mod, "_probe_cache", {})
    monkeypatch.setattr(conntrack_mod, "_probe_kernel", lambda: pytest.fail("probed"))
    caps = conntrack_mod.probe_capabilities()
    assert probe_cache.last["source"] == "cache"
    assert not caps.dump_zone and not caps.flush_zone and caps.flush_family
    monkeypatch.delenv("PYCONNTRACK_DISABLE")
    assert conntrack_mod.probe_capabilities().flush_zone
    with open(os.path.join(d, probe_cache.FILE_NAME)) as f:
        assert json.load(f)["capabilities"]["flush_zone"] is True


def _cli_probe(env, *args):
    out = subprocess.run([sys.executable, "-m", "pyconntrack", "probe", "--json", *args],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_cli_probe_uses_then_refreshes_the_cache(tmp_path):
    """The real kernel probe once, then a cached verdict with the same
    findings; --refresh probes again; =0 never touches the cache."""
    os.chmod(tmp_path, 0o755)
    d = str(tmp_path / "cache")
    env = {**os.environ, "PYCONNTRACK_PROBE_CACHE": d}
    env.pop("PYCONNTRACK_DISABLE", None)
    first = _cli_probe(env)
    assert first["source"] == "probe" and first["probed"]
    second = _cli_probe(env)
    assert second["source"] == "cache"
    strip = lambda d: {k: v for k, v in d.items() if k not in ("source", "cache")}  # noqa: E731
    assert strip(second) == strip(first)
    assert _cli_probe(env, "--refresh")["source"] == "probe"
    os.unlink(os.path.join(d, probe_cache.FILE_NAME))
    off = _cli_probe({**env, "PYCONNTRACK_PROBE_CACHE": "0"})
    assert off["source"] == "probe" and not os.listdir(d)


def test_umask_does_not_leave_an_unusable_directory(store):
    old = os.umask(0o027)
    try:
        p = Prober()
        p.get(store)
        p.get(store)
    finally:
        os.umask(old)
    assert p.calls == 1, probe_cache.last
    assert os.stat(store.directory).st_mode & 0o777 == 0o755
    assert os.stat(store.path).st_mode & 0o777 == 0o644


def test_shim_digest_is_the_sha256_of_the_shim():
    import hashlib
    from pyconntrack import _pct
    with open(_pct.__file__, "rb") as f:
        assert probe_cache._shim_sha256() == hashlib.sha256(f.read()).hexdigest()
