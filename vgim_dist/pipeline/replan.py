"""Re-planning a pipeline for fewer workers than it was started with (a node lost and not replaced).

Checkpoints are keyed by module and every module has its own optimizer and RNG stream, so any split of the
same modules continues a run with the same numbers: re-planning changes where modules train, never what
they compute. `fewer_workers` is the one place that chooses the new split; a planner that measures stage
costs can take its place behind the same signature.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Module indices per stage and data-parallel workers per stage."""

    stages: list[list[int]]
    replicas: list[int]

    @property
    def workers(self) -> int:
        return sum(self.replicas)


def fewer_workers(topo: Topology, workers: int) -> Topology:
    """A topology of the same modules on at most ``workers`` workers (at least 1).

    First replicas go (a replicated stage drops to one worker, the most replicated first), then the last
    two stages merge, again and again: the encoder's first modules are the heaviest (the first convolutions
    run at the highest frame rate), so they keep their own workers longest.
    """
    stages, replicas = [list(s) for s in topo.stages], list(topo.replicas)
    while sum(replicas) > max(1, workers):
        if max(replicas) > 1:
            replicas[replicas.index(max(replicas))] = 1
            continue
        stages[-2:] = [stages[-2] + stages[-1]]
        del replicas[-1]
    return Topology(stages, replicas)
