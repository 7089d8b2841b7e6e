"""Tooling, not runtime: the benchmark harness (``pyconntrack bench``), its
worker processes (:mod:`.peers`), the eBPF index figures (:mod:`.index_bench`,
``bench --index``), the demo (``pyconntrack demo``) and their progress bar.
Nothing that an agent embeds imports this package.

``add_parser``/``run`` are the CLI plugin entry points (``PLUGINS`` in
:mod:`pyconntrack.cli`); the harness is imported only when they are called.
"""
from __future__ import annotations


def add_parser(sub, name: str) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    from .harness import add_parser as _add_parser
    _add_parser(sub, name)


def run(args) -> int:
    """Run ``pyconntrack bench`` with parsed ``args``; the exit code."""
    from .harness import run as _run
    return _run(args)


__all__ = ["add_parser", "run"]
