"""The binding loads, matches this package, and every shared struct lays out."""
import pyconntrack
from pyconntrack import _lowlevel as ll


def test_struct_sizes_are_consistent():
    # cffi checks cdef against the compiler only when a struct is first used
    sizes = ll.sizes()
    assert all(s > 0 for s in sizes)
    assert sizes[1] >= 4 * 16 + 4 * 4  # pct_entry holds four addresses


def test_abi_version_matches():
    assert ll.lib.PCT_ABI_VERSION == ll.ABI_VERSION


def test_public_api():
    for name in pyconntrack.__all__:
        assert hasattr(pyconntrack, name), name
    assert issubclass(pyconntrack.InvalidFilter, ValueError)
    assert issubclass(pyconntrack.PermissionDenied, PermissionError)
    assert issubclass(pyconntrack.InvalidFilter, pyconntrack.ConntrackError)
