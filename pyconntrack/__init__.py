"""pyconntrack: delete Linux conntrack entries by zone, address, port and mark,
exactly and fast, on every kernel.

    >>> import pyconntrack
    >>> with pyconntrack.Conntrack(netns="tenant1") as ct:
    ...     ct.delete(pyconntrack.Filter(zone=4242, addr="10.1.2.3"))
"""
from .conntrack import Conntrack, probe_capabilities
from .errors import (ConntrackError, InvalidFilter, KernelUnsupported, NamespaceNotFound,
                     PermissionDenied)
from .filter import Filter
from .types import Capabilities, DeleteResult, Entry

__version__ = "0.1.0"

_LAZY = {"CleanupHandle", "ConntrackManager", "ZonesExhausted"}


def __getattr__(name: str):
    """The agent manager (asyncio, threads) is imported on first use: a CLI
    call or a plain Conntrack user does not pay for it at start-up."""
    if name in _LAZY:
        from . import manager
        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Capabilities", "CleanupHandle", "Conntrack", "ConntrackError", "ConntrackManager",
    "DeleteResult", "Entry", "Filter", "ZonesExhausted",
    "InvalidFilter", "KernelUnsupported", "NamespaceNotFound", "PermissionDenied",
    "probe_capabilities", "__version__",
]
