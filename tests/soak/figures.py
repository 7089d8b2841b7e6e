"""Figures of the hardening runs: kept per session, printed at the end of
the run (tests/soak/conftest.py) and merged into build/reliability-figures.json
(docs/reliability.md quotes them)."""
from __future__ import annotations

import json
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATH = os.path.join(REPO, "build", "reliability-figures.json")
FIGURES: dict = {}


def record(name: str, **values) -> None:
    values["recorded"] = time.strftime("%Y-%m-%d %H:%M:%S")
    FIGURES.setdefault(name, {}).update(values)
    try:
        os.makedirs(os.path.dirname(PATH), exist_ok=True)
        try:
            with open(PATH) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        saved[name] = FIGURES[name]
        tmp = PATH + ".tmp"
        with open(tmp, "w") as f:
            json.dump(saved, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, PATH)
    except OSError:
        pass
