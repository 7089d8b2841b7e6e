"""The soak variants (``pytest -m soak``; deselected by default) and the
figures every hardening test records, printed at the end of the run."""
from __future__ import annotations

import json
import sys
import os

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long hardening runs (make soak: pytest -m soak)")


def pytest_terminal_summary(terminalreporter):
    from soak.figures import FIGURES
    if not FIGURES:
        return
    terminalreporter.section("hardening figures (also in build/reliability-figures.json)")
    for name, values in FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(values, default=str)}")
