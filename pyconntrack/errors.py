"""The exception tree: one base, a few typed subclasses, each with errno and
the C operation that failed."""
from __future__ import annotations

import errno as _errno
import os
from typing import Optional


class ConntrackError(Exception):
    """Base of every pyconntrack error."""

    def __init__(self, message: str, errno: Optional[int] = None,
                 operation: Optional[str] = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.operation = operation

    def __str__(self) -> str:
        text = super().__str__()
        if self.operation:
            text += f" (in {self.operation})"
        return text


class InvalidFilter(ConntrackError, ValueError):
    """A filter or argument was rejected before anything reached the kernel."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.EINVAL, None)


class PermissionDenied(ConntrackError, PermissionError):
    """The kernel refused: CAP_NET_ADMIN (and CAP_SYS_ADMIN for netns) needed."""


class NamespaceNotFound(ConntrackError, FileNotFoundError):
    """The named network namespace does not exist."""


class KernelUnsupported(ConntrackError):
    """A forced strategy or feature that this kernel does not (safely) have."""


def from_errno(rc: int, operation: str, netns: Optional[str] = None) -> ConntrackError:
    """Map a negative errno returned by the shim to a typed exception."""
    code = -rc if rc < 0 else rc
    reason = os.strerror(code)
    if code in (_errno.EPERM, _errno.EACCES):
        return PermissionDenied(
            f"permission denied: CAP_NET_ADMIN is needed to read or change conntrack"
            f"{' (and CAP_SYS_ADMIN to enter a netns)' if netns else ''}: {reason}",
            code, operation)
    if code == _errno.ENOENT and operation == "pct_open":
        return NamespaceNotFound(f"network namespace not found: {netns}", code, operation)
    if code in (_errno.EOPNOTSUPP, _errno.EAFNOSUPPORT, _errno.EPROTONOSUPPORT):
        return KernelUnsupported(f"not supported by this kernel: {reason}", code, operation)
    return ConntrackError(f"conntrack operation failed: {reason} (errno {code})",
                          code, operation)
