"""A netfilter BPF program that returns NF_ACCEPT at once, linked where the
index's hook is (IPv4 and IPv6, PRE_ROUTING and LOCAL_OUT, the same
priority): what any netfilter BPF program costs a packet before it does
anything, the floor of the index's setup-rate figures. Benchmark tooling:
two instructions loaded with the bpf(2) syscall, no BPF object, nothing
pinned; the links go when the handle is closed (or the process exits)."""
from __future__ import annotations

import ctypes
import os
import platform
import struct
import threading
from typing import List, Optional

from .._lowlevel import (INDEX_HOOK_PRIORITY, INDEX_HOOKS, NETFILTER_ATTACH_TYPE,
                         NETFILTER_PROG_TYPE)
from .peers import enter_netns

# uapi/linux/bpf.h
BPF_PROG_LOAD = 5
BPF_LINK_CREATE = 28
NR_BPF = {"x86_64": 321, "aarch64": 280}
NF_ACCEPT = 1
# r0 = NF_ACCEPT; exit
PROGRAM = struct.pack("<BBhi", 0xb7, 0, 0, NF_ACCEPT) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def unsupported() -> Optional[str]:
    """Why the bare hook cannot be linked here, or None."""
    if platform.machine() not in NR_BPF:
        return f"bpf(2) number unknown for {platform.machine()}"
    return None


def _bpf(cmd: int, attr: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(ctypes.c_long(NR_BPF[platform.machine()]), ctypes.c_int(cmd), buf,
                      ctypes.c_uint(len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return fd


class BareHook:
    """Links the do-nothing program into the namespace ``netns`` (a name in
    /var/run/netns or a path). A netfilter link hooks the namespace of the
    task that creates it, so the links are made by a thread that entered it."""

    def __init__(self, netns: str) -> None:
        self.fds: List[int] = []
        insns = ctypes.create_string_buffer(PROGRAM, len(PROGRAM))
        license = ctypes.create_string_buffer(b"GPL")
        # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
        # log_level, log_size, log_buf, kern_version, prog_flags, prog_name,
        # prog_ifindex, expected_attach_type
        attr = struct.pack("=IIQQIIQII16sII", NETFILTER_PROG_TYPE, len(PROGRAM) // 8,
                           ctypes.addressof(insns), ctypes.addressof(license), 0, 0, 0, 0, 0,
                           b"pct_bare_hook", 0, NETFILTER_ATTACH_TYPE)
        self.fds.append(_bpf(BPF_PROG_LOAD, attr.ljust(128, b"\0")))
        errors: List[BaseException] = []
        thread = threading.Thread(target=self._link, args=(netns, errors))
        thread.start()
        thread.join()
        if errors:
            self.close()
            raise errors[0]

    def _link(self, netns: str, errors: List[BaseException]) -> None:
        try:
            enter_netns(netns)   # this thread only: it ends after linking
            for pf, hook in INDEX_HOOKS:
                # BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags,
                # netfilter {pf, hooknum, priority, flags}
                attr = struct.pack("=IIIIIIiI", self.fds[0], 0, NETFILTER_ATTACH_TYPE, 0, pf,
                                   hook, INDEX_HOOK_PRIORITY, 0)
                self.fds.append(_bpf(BPF_LINK_CREATE, attr.ljust(64, b"\0")))
        except BaseException as e:   # raised again in the caller's thread
            errors.append(e)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def __enter__(self) -> "BareHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
