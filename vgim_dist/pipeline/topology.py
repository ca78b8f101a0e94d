"""Which world rank trains which stage, as which replica, and which ranks it exchanges activations with.

World ranks run stage by stage, replicas adjacent: with ``pipeline.replicas = [1, 2, 1]`` rank 0 is stage 0,
ranks 1 and 2 are the two replicas of stage 1, rank 3 is stage 2.
"""

from __future__ import annotations

from dataclasses import dataclass

from vgim_dist.config import check_replicas


@dataclass(frozen=True)
class Topology:
    replicas: tuple[int, ...]   # workers per stage
    rank: int                   # world rank of this worker

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world} workers")
        check_replicas(self.replicas)

    @property
    def world(self) -> int:
        return sum(self.replicas)

    @property
    def stages(self) -> int:
        return len(self.replicas)

    def first(self, stage: int) -> int:
        """World rank of replica 0 of ``stage``."""
        return sum(self.replicas[:stage])

    def ranks(self, stage: int) -> list[int]:
        """World ranks of every replica of ``stage``."""
        return list(range(self.first(stage), self.first(stage) + self.replicas[stage]))

    @property
    def stage(self) -> int:
        return max(s for s in range(self.stages) if self.first(s) <= self.rank)

    @property
    def replica(self) -> int:
        return self.rank - self.first(self.stage)

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def _peers(self, neighbour: int) -> list[int]:
        # Equal counts: the replica twin. Otherwise one side has one worker, which exchanges with every
        # replica of the other side, while each of those exchanges with it.
        if self.replicas[neighbour] == self.replicas[self.stage]:
            return [self.first(neighbour) + self.replica]
        return self.ranks(neighbour)

    @property
    def upstream(self) -> list[int]:
        """Ranks this worker receives from, in batch order (empty for stage 0)."""
        return self._peers(self.stage - 1) if self.stage > 0 else []

    @property
    def downstream(self) -> list[int]:
        """Ranks this worker sends to, in batch order (empty for the last stage)."""
        return [] if self.is_last else self._peers(self.stage + 1)
