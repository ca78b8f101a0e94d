"""The transport's plugged parts of a `StageLoop` (train/loop.py): input from the previous stage's workers,
output to the next stage's workers. Neighbouring stages have equal replica counts, or 1 on one side."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vgim_dist.parallel.data_parallel import split_sizes
from vgim_dist.pipeline.transport import Receiver, Sender


class Fanout:
    """To the next stage: all rows to one worker, or each of its N replicas its share in batch order."""

    def __init__(self, senders: list[Sender]):
        self.senders = senders

    def send(self, x: torch.Tensor, carried: torch.Tensor) -> None:
        parts = x.split(split_sizes(x.shape[0], len(self.senders))) if len(self.senders) > 1 else [x]
        for sender, part in zip(self.senders, parts):
            sender.send(part, carried)

    def close(self) -> None:
        for sender in self.senders:
            sender.close()

    @property
    def wait_s(self) -> float:
        return sum(s.wait_s for s in self.senders)

    @property
    def depth_sum(self) -> int:
        return max(s.depth_sum for s in self.senders)


class Gather:
    """From the previous stage: one worker's rows, or its N replicas' shares concatenated in batch order."""

    def __init__(self, receivers: list[Receiver]):
        self.receivers = receivers

    def items(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        streams = [iter(r) for r in self.receivers]
        while True:
            items = [next(stream, None) for stream in streams]   # read every stream, its end included
            if any(item is None for item in items):
                assert all(item is None for item in items), "replica streams ended at different steps"
                return
            # Replicas all-reduce their loss terms, so any one's metrics vector stands for the stage.
            yield torch.cat([x for x, _ in items]) if len(items) > 1 else items[0][0], items[0][1]

    @property
    def wait_s(self) -> float:
        return sum(r.wait_s for r in self.receivers)
