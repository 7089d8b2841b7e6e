"""Scratch network namespaces for the demo, tests and benchmarks (pyroute2
when installed, iproute2 otherwise). Never the caller's own namespace."""
from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from typing import Iterator

NETNS_DIR = "/var/run/netns"


def create(name: str) -> None:
    try:
        from pyroute2 import netns as p2netns
    except ImportError:
        subprocess.run(["ip", "netns", "add", name], check=True)
        return
    p2netns.create(name)


def remove(name: str) -> None:
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        return
    try:
        from pyroute2 import netns as p2netns
    except ImportError:
        subprocess.run(["ip", "netns", "delete", name], check=True)
        return
    p2netns.remove(name)


@contextlib.contextmanager
def scratch(prefix: str = "pct") -> Iterator[str]:
    """A fresh, uniquely named netns, always removed afterwards."""
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    create(name)
    try:
        yield name
    finally:
        remove(name)
