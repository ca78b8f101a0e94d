"""The parts a `StageLoop` (train/loop.py) is plugged into that need no transport: its input from the data
loader or from the previous stage in the same process, its output to the next stage in the same process or
nowhere, and its checkpoints committed locally or gathered over a process group with rank 0 committing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from vgim_dist.config import DataConfig
from vgim_dist.parallel.data_parallel import ReplicaGroup, split_sizes
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.lower import train_source


class SourceInput:
    """The first stage's input: the data source's batches up to step ``steps``, until ``stopping()`` says stop
    (checked before each batch; only the first stage decides to stop, the others stop where its stream ends,
    so all stop together). A replica of the first stage keeps its share of each batch's rows."""

    def __init__(self, data: DataConfig, seed: int, steps: int, device: torch.device,
                 stopping: Callable[[], bool] = lambda: False, replicas: ReplicaGroup | None = None):
        self.data, self.seed, self.steps = data, seed, steps
        self.stopping, self.replicas = stopping, replicas
        self.none = torch.empty(0, dtype=torch.float64, device=device)     # no stage before: nothing carried
        self.wait_s = 0.0       # reading data: the first stage's wait for input

    def items(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = train_source(self.data, self.seed)
        try:
            for step in range(start, self.steps):
                if self.stopping():
                    return
                t0 = time.perf_counter()
                x = source.batch(step)
                if self.replicas is not None:
                    sizes = split_sizes(x.shape[0], self.replicas.world)
                    x = x[sum(sizes[:self.replicas.rank]):][:sizes[self.replicas.rank]]
                self.wait_s += time.perf_counter() - t0
                yield x, self.none
        finally:
            source.close()


class Handoff:
    """The output of one stage and the input of the next, in the same process: each item the consumer asks
    for runs one step of the producer's loop (``producer``, a restored `StageLoop`), which hands its output
    here."""

    wait_s = 0.0        # in one process nobody waits for anyone: the stages take turns
    depth_sum = 0

    def __init__(self):
        self.producer = None
        self.item: tuple[torch.Tensor, torch.Tensor] | None = None

    def send(self, x: torch.Tensor, carried: torch.Tensor) -> None:
        self.item = (x, carried)

    def close(self) -> None:
        self.item = None

    def items(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in self.producer.steps():     # restored at ``start`` like the consumer
            item, self.item = self.item, None
            yield item


class Nowhere:
    """The last stage's output: nothing downstream."""

    wait_s = 0.0
    depth_sum = 0

    def send(self, x: torch.Tensor, carried: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class LocalCommit:
    """Checkpoints of ``parts`` stages in this process: committed once each has saved the step."""

    def __init__(self, checkpoints: CheckpointManager, modules: list[int], parts: int = 1,
                 partitions: dict[int, int] | None = None):
        self.checkpoints, self.modules, self.parts, self.partitions = checkpoints, modules, parts, partitions
        self.written: dict[int, list[dict[str, dict]]] = {}

    def agree(self, start: int) -> int:
        return start

    def commit(self, step: int, written: dict[str, dict]) -> None:
        self.written.setdefault(step, []).append(written)
        if len(self.written[step]) == self.parts:
            files = {name: entry for w in self.written.pop(step) for name, entry in w.items()}
            self.checkpoints.commit(step, self.modules, files, partitions=self.partitions)


class GatheredCommit:
    """Checkpoints of a worker group (one stage replica per rank of ``group``, a gloo group): each rank saves
    its part; once all have written, rank 0 commits. Every rank starts from the newest intact committed
    checkpoint as rank 0 sees it: the driver's resume step on a first attempt, the last commit on a restart
    after a failure (or the one before it, when a file of the last is damaged)."""

    def __init__(self, checkpoints: CheckpointManager, modules: list[int], group: dist.ProcessGroup,
                 partitions: dict[int, int] | None = None):
        self.local = LocalCommit(checkpoints, modules, partitions=partitions)
        self.group = group
        self.rank = dist.get_rank(group)

    def agree(self, start: int) -> int:
        step = torch.tensor([(self.local.checkpoints.newest_intact() or 0) if self.rank == 0 else 0])
        dist.broadcast(step, src=0, group=self.group)
        return int(step)

    def commit(self, step: int, written: dict[str, dict]) -> None:
        every: list[dict[str, dict] | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(every, written, group=self.group)    # every stage has written `step`
        if self.rank == 0:
            self.local.commit(step, {name: entry for w in every for name, entry in w.items()})


def zero_partitions(modules: list[list[int]], replicas: list[int]) -> dict[int, int]:
    """DeepSpeed ZeRO: how many replicas of each module hold a partition of its state (those of its stage)."""
    return {i: n for mods, n in zip(modules, replicas) for i in mods}
