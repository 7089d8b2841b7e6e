"""Choosing how to delete: from the filter and what the probe proved."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from . import _lowlevel as ll
from .errors import InvalidFilter, KernelUnsupported
from .filter import Filter
from .types import Capabilities

STRATEGIES = ("auto", "flush", "walk", "index")

# Cost model for auto (measured on 6.18, 2 vCPUs): a kernel walk (dump or
# flush) costs ~0.4 us per bucket and per entry of the whole table; the index
# costs ~3 us per record of the zone.
WALK_US_PER_SLOT = 0.4
INDEX_US_PER_RECORD = 3.0


@dataclasses.dataclass(frozen=True)
class IndexState:
    """What the eBPF zone index can do for one filter (see index.py)."""

    attached: bool = False
    refusal: str = "not attached"   # '' when the index can evaluate the filter
    dirty: int = 0                  # records lost in the filter's zone
    window: int = 0                 # records (and holes) of the zone
    table_slots: int = 0            # buckets + entries a walk would visit
    blind: str = ""                 # why the index cannot vouch for its zones now

    @property
    def usable(self) -> bool:
        return self.attached and not self.refusal and not self.dirty and not self.blind

    def why_not(self) -> str:
        if not self.attached:
            return "index not attached"
        if self.refusal:
            return f"index: {self.refusal}"
        if self.dirty:
            return f"index: zone dirty ({self.dirty} records lost)"
        if self.blind:
            return f"index cannot vouch for the zone: {self.blind}"
        return ""

    def cheaper_than_walk(self) -> bool:
        return self.window * INDEX_US_PER_RECORD <= self.table_slots * WALK_US_PER_SLOT


@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str        # "flush" or "walk"
    kflags: int          # kernel-side dump filters the walk may use
    use_zone_attr: bool  # send CTA_ZONE with each delete
    reason: str          # why this strategy (and why not a faster one)


def kernel_filters(caps: Capabilities) -> int:
    """Dump filters this kernel is proven to honour; the shim re-checks
    every field regardless, so these only save work."""
    flags = ll.K_FAMILY
    if caps.dump_mark:
        flags |= ll.K_MARK
    if caps.dump_zone:
        flags |= ll.K_ZONE
    if caps.dump_filter_v4:
        flags |= ll.K_TUPLE_V4
    if caps.dump_filter_v6:  # false where the IPv6 match is inverted
        flags |= ll.K_TUPLE_V6
    return flags


def _flush_refusal(f: Filter, caps: Capabilities) -> str:
    """Why one flush message cannot do this delete safely ('' if it can)."""
    if not f.is_zone_flushable():
        return "filter is more than zone [+ family, mark]"
    if not caps.probed:
        return f"kernel not probed ({caps.probe_error or 'probe did not run'})"
    if not caps.flush_zone:
        return "kernel ignores the zone in a flush (probe): a flush would wipe every zone"
    if f.family is not None and not caps.flush_family:
        return "kernel ignores the family in a flush (probe)"
    if f.mark is not None and not caps.flush_mark:
        return "kernel ignores the mark in a flush (probe)"
    return ""


def plan_delete(f: Filter, caps: Capabilities, strategy: str = "auto",
                index: IndexState = IndexState()) -> Plan:
    if strategy not in STRATEGIES:
        raise InvalidFilter(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    use_zone = caps.send_zone
    kflags = kernel_filters(caps)
    if strategy == "index":
        if not index.usable:
            raise KernelUnsupported(f"strategy index refused: {index.why_not()}")
        return Plan("index", kflags, use_zone, "forced")
    if strategy == "auto" and index.usable:
        if index.cheaper_than_walk():
            return Plan("index", kflags, use_zone,
                        f"index: {index.window} records vs a walk of {index.table_slots}")
    index_note = index.why_not() if index.attached else ""
    if index.usable:
        index_note = f"index: zone too large ({index.window} records) to beat a walk"
    refusal = _flush_refusal(f, caps)
    if strategy == "flush":
        if refusal and not f.is_zone_flushable():
            raise InvalidFilter(f"strategy flush cannot express this filter: {refusal}")
        if refusal:
            raise KernelUnsupported(f"strategy flush refused: {refusal}")
        return Plan("flush", kflags, use_zone, "forced")
    if strategy == "walk":
        return Plan("walk", kflags, use_zone, "forced")
    prefix = f"{index_note}; " if index_note else ""
    if not refusal:
        return Plan("flush", kflags, use_zone,
                    f"{prefix}one kernel flush (zone filter proven by probe)")
    return Plan("walk", kflags, use_zone, f"{prefix}walk: {refusal}")


def plan_delete_many(filters: Sequence[Filter], caps: Capabilities,
                     index: Sequence[IndexState] = ()) -> Plan:
    """One walk for all filters, or, when the index holds every filter's zone
    (clean) and reading those zones costs less than a walk, index lookups."""
    if not filters:
        raise InvalidFilter("delete_many needs at least one filter")
    use_zone = caps.send_zone
    kflags = kernel_filters(caps)
    walk = Plan("walk", kflags, use_zone, f"one walk for {len(filters)} filters")
    if not index or len(index) != len(filters) or not index[0].attached:
        return walk
    blocked = next((st.why_not() for st in index if not st.usable), "")
    if blocked:
        return dataclasses.replace(walk, reason=f"{blocked}; {walk.reason}")
    windows = {f.zone: st.window for f, st in zip(filters, index)}
    total = sum(windows.values())
    cost = IndexState(attached=True, refusal="", window=total,
                      table_slots=index[0].table_slots)
    if not cost.cheaper_than_walk():
        return dataclasses.replace(
            walk, reason=f"index: {total} records in {len(windows)} zones cost more than a walk; "
                         f"{walk.reason}")
    return Plan("index", kflags, use_zone,
                f"index: {total} records in {len(windows)} zones vs a walk of "
                f"{index[0].table_slots}")
