"""What bnpass did: one ``GraphRecord`` per graph it compiled, kept for the CLI and the tests."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .sites import Site

__all__ = ["GraphRecord", "compile_records", "clear_records", "new_record", "keep"]


@dataclasses.dataclass
class GraphRecord:
    graph_index: int
    sites: list[Site]
    group: Optional[str]
    world_size: int
    # Filled in by the lowering from the graphs AOTAutograd hands to Inductor.
    collectives: dict = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0})
    collectives_unpacked: dict = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0})
    schedules: dict = dataclasses.field(default_factory=dict)  # direction -> schedule.ScheduleReport
    collective_bytes: dict = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0})
    host_syncs: dict = dataclasses.field(default_factory=lambda: {"forward": 0, "backward": 0})
    # direction -> the collectives that graph issues, in order (schedule.collective_sequence):
    # what the ranks agree on before the first one (agree.py).
    sequence: dict = dataclasses.field(default_factory=dict)
    # For `bnpass inspect` (plain data, see bnpass/inspect/capture.py). Filled in by the backend around the
    # rewrite: site index -> the Dynamo node names of the site (its BN call, the node in its place), and
    # site index -> {"before": lines, "after": lines} of the Dynamo graph around the site.
    site_nodes: dict = dataclasses.field(default_factory=dict)
    snapshots: dict = dataclasses.field(default_factory=dict)
    # Filled in by the lowering: "forward"/"backward" -> bnpass.inspect.capture.digest(...) of the graph handed
    # to Inductor, and -> bnpass.inspect.capture.kernel_info(...) of what Inductor generated for it.
    graphs: dict = dataclasses.field(default_factory=dict)
    kernels: dict = dataclasses.field(default_factory=dict)

    def count(self, action: str) -> int:
        return sum(site.action == action for site in self.sites)

    def to_json(self) -> dict:
        return {
            "graph_index": self.graph_index,
            "group": self.group,
            "world_size": self.world_size,
            "sites": [s.to_json() for s in self.sites],
            "collectives": dict(self.collectives),
            "collectives_unpacked": dict(self.collectives_unpacked),
            "collective_bytes": dict(self.collective_bytes),
            "host_syncs": dict(self.host_syncs),
            "sequence": {d: [dict(c) for c in seq] for d, seq in self.sequence.items()},
            "split_conv_backwards": {d: r.split_conv_backwards for d, r in self.schedules.items()},
        }


_RECORDS: list[GraphRecord] = []


def new_record(sites: list[Site], group: Optional[str], world_size: int) -> GraphRecord:
    """A record for a graph being compiled; ``keep`` it once the compile succeeded (Dynamo may
    abandon a compile and restart the frame's analysis)."""
    return GraphRecord(-1, sites, group, world_size)


def keep(record: GraphRecord) -> None:
    record.graph_index = len(_RECORDS)
    _RECORDS.append(record)


def compile_records() -> list[GraphRecord]:
    """The records of every graph bnpass compiled in this process, oldest first."""
    return list(_RECORDS)


def clear_records() -> None:
    _RECORDS.clear()
