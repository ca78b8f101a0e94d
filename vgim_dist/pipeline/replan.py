"""Re-planning a pipeline for fewer workers than it was started with (a node lost and not replaced).

Checkpoints are keyed by module and every module has its own optimizer and RNG stream, so any split of the
same modules continues a run with the same numbers: re-planning changes where modules train, never what
they compute. A `Replan` chooses the new layout; `fewer_workers` is the runner's own, and the launch passes
the planner's instead when the run's layout was planned from measured module times.
"""

from __future__ import annotations

from collections.abc import Callable

# (stages, replicas, workers that fit) -> (stages, replicas) using at most that many workers
Replan = Callable[[list[list[int]], list[int], int], tuple[list[list[int]], list[int]]]


def fewer_workers(stages: list[list[int]], replicas: list[int], workers: int) -> tuple[list[list[int]], list[int]]:
    """The same modules on at most ``workers`` workers (at least 1).

    First replicas go (a replicated stage drops to one worker, the most replicated first), then the last
    two stages merge, again and again: the encoder's first modules are the heaviest (the first convolutions
    run at the highest frame rate), so they keep their own workers longest.
    """
    stages, replicas = [list(s) for s in stages], list(replicas)
    while sum(replicas) > max(1, workers):
        if max(replicas) > 1:
            replicas[replicas.index(max(replicas))] = 1
            continue
        stages[-2:] = [stages[-2] + stages[-1]]
        del replicas[-1]
    return stages, replicas
