"""Benchmark harness (pyconntrack bench): placeholder until it lands."""
from __future__ import annotations


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="benchmarks against peers (not yet available)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")


def run(args) -> int:
    from .errors import KernelUnsupported
    raise KernelUnsupported("the benchmark harness is not built yet")
