"""The capability probe's verdict, kept for the rest of the boot.

The probe (csrc/pct_probe.c) dumps and flushes sentinel entries in a throwaway
network namespace. The conntrack hash table is one for all namespaces, so each
of those walks pays for every entry on the machine: 4 s for a fresh process
while another namespace held 1M entries. What the probe learns is a property
of the running kernel, so a root process stores it in
``/run/pyconntrack/capabilities.json`` (tmpfs: a reboot clears it) and later
processes read it instead of walking the table.

A cached verdict is trusted only when all of this holds, otherwise it is
ignored and the kernel probed again (and, by root, the file rewritten):

- every directory above the cache directory is a real directory (no
  symlink) owned by root and not writable by group or others (or sticky,
  like /tmp); the cache directory is opened with O_NOFOLLOW and must be
  root's with mode 0700 or 0755;
- the file is opened with O_NOFOLLOW (a symlink is refused), and ``fstat``
  shows a regular file owned by root with mode 0600 or 0644, one link and
  at most 64 KiB;
- it is strict JSON with exactly the expected keys and value types;
- its key matches this process: cache format, pyconntrack version, the
  SHA-256 of the compiled shim (which holds the probe), the Capabilities
  fields, the kernel release and build string, and the boot id
  (/proc/sys/kernel/random/boot_id): a reboot, another kernel or another
  pyconntrack probes again;
- the verdict itself is a complete probe (``probed`` true, no error).

Whether the eBPF index can be loaded also depends on the caller's privileges:
that part of a cached verdict is used only when the reader's effective
capability set equals the writer's; otherwise it is re-checked (a program
load, ~10 ms).

Only root (euid 0) writes, atomically (a temporary file in the same directory,
then rename). ``PYCONNTRACK_PROBE_CACHE=0`` turns the cache off (no read, no
write; the test suite does this so that it keeps proving the kernel's
behaviour); an absolute directory there uses that directory instead (same
checks). ``PYCONNTRACK_DISABLE`` still applies on top of a cached verdict.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import threading
from typing import Callable, Optional, Tuple

from .types import Capabilities

ENV = "PYCONNTRACK_PROBE_CACHE"
DEFAULT_DIR = "/run/pyconntrack"
FILE_NAME = "capabilities.json"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
FORMAT = 1
MAX_BYTES = 64 * 1024
# capability fields that depend on the caller's privileges, not only on the kernel
PRIVILEGE_FIELDS = ("netfilter_bpf", "zoned_kfuncs", "index_error")

_BOOT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HEX = re.compile(r"^[0-9a-f]{1,16}$")
_lock = threading.Lock()
_shim_digest: Optional[str] = None

# what the last probe_capabilities() of this process did (pyconntrack probe shows it)
last: dict = {"source": "", "cache": ""}


class Unsafe(Exception):
    """The cache (or its directory) cannot be trusted: ignored, never used."""


@dataclasses.dataclass
class Store:
    """Where the cache lives and what keys it (tests point these elsewhere)."""

    directory: str = DEFAULT_DIR
    boot_id_path: str = BOOT_ID_PATH
    release: Optional[str] = None       # None: os.uname().release
    kernel_version: Optional[str] = None  # None: os.uname().version

    @property
    def path(self) -> str:
        return os.path.join(self.directory, FILE_NAME)


def store_from_env(environ=None) -> Optional[Store]:
    """The Store to use, or None when the cache is off (PYCONNTRACK_PROBE_CACHE=0)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip()
    if value.lower() in ("0", "off", "no", "false"):
        return None
    if value.startswith("/"):
        return Store(directory=value)
    if value and value.lower() not in ("1", "on", "yes", "true"):
        return None  # unknown setting: the safe reading is "no cache"
    return Store()


# -------------------------------------------------------------------- the key

def _shim_sha256() -> str:
    """SHA-256 of the compiled shim: a rebuilt probe is a different probe."""
    global _shim_digest
    if _shim_digest is None:
        from . import _pct  # type: ignore[attr-defined]
        try:  # CPython's own SHA-256: hashlib would load OpenSSL (~3 ms at start-up)
            from _sha256 import sha256  # type: ignore[import-not-found]  # 3.11
        except ImportError:
            try:
                from _sha2 import sha256  # type: ignore[import-not-found]  # 3.12+
            except ImportError:
                from hashlib import sha256
        h = sha256()
        with open(_pct.__file__, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                h.update(chunk)
        _shim_digest = h.hexdigest()
    return _shim_digest


def _fields_signature() -> str:
    return ",".join(f"{f.name}:{type(f.default).__name__}"
                    for f in dataclasses.fields(Capabilities))


def read_boot_id(path: str) -> str:
    with open(path) as f:
        text = f.read(64).strip()
    if not _BOOT_ID.match(text):
        raise Unsafe(f"boot id in {path} is not a UUID")
    return text


def key(store: Store) -> dict:
    """What a cached verdict must have been made under. Raises Unsafe when
    the boot id cannot be read (no key: no cache)."""
    from . import __version__
    try:
        boot_id = read_boot_id(store.boot_id_path)
    except OSError as exc:
        raise Unsafe(f"cannot read the boot id: {exc.strerror}") from None
    u = os.uname()
    return {"format": FORMAT, "pyconntrack": __version__, "shim_sha256": _shim_sha256(),
            "fields": _fields_signature(),
            "kernel_release": store.release if store.release is not None else u.release,
            "kernel_version": (store.kernel_version if store.kernel_version is not None
                               else u.version),
            "boot_id": boot_id}


def capeff() -> int:
    """The effective capability set of this process (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return -1


# ------------------------------------------------------------ safe file access

DIR_MODES = (0o700, 0o755)
FILE_MODES = (0o600, 0o644)


def _safe_mode(st: os.stat_result, sticky_ok: bool) -> bool:
    """An ancestor directory: root's, not writable by others unless sticky."""
    if st.st_uid != 0:
        return False
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) == 0:
        return True
    return sticky_ok and bool(st.st_mode & stat.S_ISVTX)


def _exact_mode(st: os.stat_result, modes: tuple) -> bool:
    """The cache directory or file: root's, with exactly one of ``modes``."""
    return st.st_uid == 0 and stat.S_IMODE(st.st_mode) in modes


def _check_ancestors(directory: str) -> None:
    """Every directory above ``directory``: real, root-owned, not writable by
    others (unless sticky, like /tmp)."""
    if not os.path.isabs(directory):
        raise Unsafe(f"cache directory {directory!r} is not absolute")
    parts = os.path.normpath(directory).split("/")[1:]
    path = "/"
    for name in [""] + parts[:-1]:
        path = os.path.join(path, name) if name else path
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise Unsafe(f"{path} is not a directory (symlinks are refused)")
        if not _safe_mode(st, sticky_ok=True):
            raise Unsafe(f"{path} is not owned by root or is writable by others")


def _open_dir(directory: str, create: bool) -> int:
    _check_ancestors(directory)
    created = False
    if create:
        try:
            os.mkdir(directory, 0o755)
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (20, 40):  # ENOTDIR, ELOOP: a file or a symlink
            raise Unsafe(f"{directory} is a symlink or not a directory") from None
        raise
    st = os.fstat(fd)
    if created and st.st_uid == 0 and stat.S_IMODE(st.st_mode) not in DIR_MODES:
        os.fchmod(fd, 0o755)  # ours, just made: the umask narrowed it
        st = os.fstat(fd)
    if not _exact_mode(st, DIR_MODES):
        os.close(fd)
        raise Unsafe(f"{directory} is not root's with mode 0700 or 0755 "
                     f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
    return fd


def _read(store: Store) -> bytes:
    dfd = _open_dir(store.directory, create=False)
    try:
        try:
            fd = os.open(FILE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                         | os.O_NOCTTY, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == 40:  # ELOOP
                raise Unsafe(f"{store.path} is a symlink") from None
            raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unsafe(f"{store.path} is not a regular file")
        if not _exact_mode(st, FILE_MODES):
            raise Unsafe(f"{store.path} is not root's with mode 0600 or 0644 "
                         f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        if st.st_nlink != 1:
            raise Unsafe(f"{store.path} has {st.st_nlink} links")
        if st.st_size > MAX_BYTES:
            raise Unsafe(f"{store.path} is larger than {MAX_BYTES} bytes")
        data = b""
        while len(data) <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) > MAX_BYTES:
            raise Unsafe(f"{store.path} is larger than {MAX_BYTES} bytes")
        return data
    finally:
        os.close(fd)


# ------------------------------------------------------------------ validation

def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def parse(data: bytes, expected_key: dict) -> Tuple[Capabilities, int]:
    """(capabilities, writer's CapEff) from a cache file's bytes; raises Unsafe
    on anything but exactly the format written by ``save`` under this key."""
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Unsafe(f"corrupt cache: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"key", "capeff", "capabilities"}:
        raise Unsafe("corrupt cache: unexpected layout")
    if doc["key"] != expected_key or not isinstance(doc["key"], dict) \
            or any(type(doc["key"][k]) is not type(v) for k, v in expected_key.items()):
        raise Unsafe("stale cache: made for another boot, kernel or pyconntrack")
    writer_capeff = doc["capeff"]
    if not isinstance(writer_capeff, str) or not _HEX.match(writer_capeff):
        raise Unsafe("corrupt cache: capeff")
    caps = doc["capabilities"]
    fields = {f.name: f for f in dataclasses.fields(Capabilities)}
    if not isinstance(caps, dict) or set(caps) != set(fields):
        raise Unsafe("corrupt cache: capability fields differ")
    for name, f in fields.items():
        if type(caps[name]) is not type(f.default):  # bool is not int, str is str
            raise Unsafe(f"corrupt cache: {name} has the wrong type")
    if caps["probed"] is not True or caps["probe_error"] != "":
        raise Unsafe("cache holds an incomplete probe")
    if caps["kernel"] != expected_key["kernel_release"]:
        raise Unsafe("corrupt cache: kernel differs from its key")
    return Capabilities(**caps), int(writer_capeff, 16)


def serialise(caps: Capabilities, k: dict, writer_capeff: int) -> bytes:
    return (json.dumps({"key": k, "capeff": format(max(writer_capeff, 0), "x"),
                        "capabilities": caps.to_dict()}, sort_keys=True, indent=1)
            + "\n").encode()


# ---------------------------------------------------------------- load / save

def load(store: Store) -> Tuple[Optional[Capabilities], str]:
    """(cached capabilities or None, why). Never raises for a bad cache."""
    try:
        k = key(store)
        caps, writer_capeff = parse(_read(store), k)
    except FileNotFoundError:
        return None, "no cache yet"
    except Unsafe as exc:
        return None, f"ignored: {exc}"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if writer_capeff != capeff():
        return caps, "hit (index availability re-checked: other privileges than the writer)"
    return caps, "hit"


def save(store: Store, caps: Capabilities) -> str:
    """Store a complete probe's verdict (root only, atomically). Returns what
    happened; never raises for an unwritable cache."""
    if os.geteuid() != 0:
        return "not written: not root"
    if not caps.probed or caps.probe_error:
        return "not written: incomplete probe"
    try:
        k = key(store)
        data = serialise(caps, k, capeff())
        dfd = _open_dir(store.directory, create=True)
    except Unsafe as exc:
        return f"not written: {exc}"
    except OSError as exc:
        return f"not written: {exc.strerror or exc}"
    tmp = f".{FILE_NAME}.{os.getpid()}.{os.urandom(6).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, FILE_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
        return "written"
    except OSError as exc:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        return f"not written: {exc.strerror or exc}"
    finally:
        os.close(dfd)


def remove(store: Store) -> bool:
    """Drop the cached verdict (root); True if there was one."""
    try:
        dfd = _open_dir(store.directory, create=False)
    except (Unsafe, OSError):
        return False
    try:
        os.unlink(FILE_NAME, dir_fd=dfd)
        return True
    except OSError:
        return False
    finally:
        os.close(dfd)


def capabilities(probe: Callable[[], Capabilities],
                 index_availability: Callable[[], tuple],
                 refresh: bool = False, store: Optional[Store] = None,
                 use_env: bool = True) -> Capabilities:
    """The kernel's capabilities: from a valid cache, else ``probe()`` (then
    cached by root). ``refresh`` probes and rewrites whatever is cached."""
    if store is None and use_env:
        store = store_from_env()
    with _lock:
        if store is None:
            last.update(source="probe", cache="disabled (PYCONNTRACK_PROBE_CACHE=0)")
            return probe()
        if not refresh:
            caps, why = load(store)
            if caps is not None:
                if why != "hit":
                    nf_bpf, zoned, reason = index_availability()
                    caps = dataclasses.replace(caps, netfilter_bpf=nf_bpf, zoned_kfuncs=zoned,
                                               index_error=reason)
                last.update(source="cache", cache=f"{why} ({store.path})")
                return caps
        else:
            why = "refresh asked"
        caps = probe()
        written = save(store, caps)
        last.update(source="probe", cache=f"{why}; {written} ({store.path})")
        return caps
