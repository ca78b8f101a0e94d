"""Point-to-point links between neighbouring stages.

Each batch goes forward as three messages: a small int64 header with the activation's dtype and shape, the
activation, and a float64 vector of the metrics gathered by the stages so far (so the last stage can log
whole rows without anyone talking to the driver). A header with ndim = -1 ends the stream. The tensors travel
on the default process group (gloo on CPU, NCCL on GPU, with no host synchronisation); the header, which the
receiver must read on the host to allocate the buffers, travels on a CPU (gloo) control group.

Which group carries the tensors is chosen per link (``link_channel``): the default group between ranks on
distinct devices (gloo between CPU ranks, NCCL between GPUs), and "staged" between two ranks that share one
GPU (fractional GPUs per worker), where NCCL refuses to run: the tensors are copied to host memory and
travel on the gloo control group. The bytes, their order and so the numbers are the same on every channel.

Backward, on the control group, the consumer sends one credit per batch received: the only backward traffic.
A producer with ``in_flight`` batches unacknowledged waits for a credit before it sends the next, so no queue
grows without bound. Credits stay off NCCL, where a credit queued behind an activation on the same stream
could deadlock the pair.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import torch
import torch.distributed as dist

HEADER = 8      # int64 slots: ndim, dtype, then the sizes
END = -1        # ndim that ends the stream
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


DEFAULT, STAGED = "default", "staged"


def device_identity(device: torch.device, node: str) -> str:
    """A name equal for two ranks exactly when they compute on the same device: the GPU's UUID, or the host."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_properties(device).uuid} on {node}"
    return f"{device.type} on {node}"


def link_channel(mine: str, peer: str) -> str:
    """How activations travel between ranks with these `device_identity`s: ``staged`` through host memory
    when they share a GPU (NCCL rejects two ranks on one device), else ``default``."""
    return STAGED if mine == peer and mine.startswith("cuda") else DEFAULT


def _header(x: torch.Tensor | None) -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.int64)
    if x is None:
        h[0] = END
    else:
        h[0], h[1] = x.dim(), DTYPES.index(x.dtype)
        h[2:2 + x.dim()] = torch.tensor(x.shape)
    return h


class Sender:
    """Stage s -> s+1: at most ``in_flight`` batches sent but not yet acknowledged."""

    def __init__(self, peer: int, in_flight: int, control: dist.ProcessGroup, channel: str = DEFAULT):
        self.peer, self.in_flight, self.control = peer, in_flight, control
        self.data = control if channel == STAGED else None    # None: the default group
        # Works of each unacknowledged batch, with the tensors they read (which must outlive the send).
        self.outstanding: deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = deque()
        self.credit = torch.zeros(1, dtype=torch.int64)
        self.wait_s = 0.0       # blocked on a credit: waiting for the consumer
        self.depth_sum = 0      # in-flight depth summed over sends

    def send(self, x: torch.Tensor, metrics: torch.Tensor) -> None:
        t0 = time.perf_counter()
        while len(self.outstanding) >= self.in_flight:
            self._take_credit()
        self.wait_s += time.perf_counter() - t0
        x = x.contiguous()
        if self.data is not None:                              # staged: through host memory
            x, metrics = x.cpu(), metrics.cpu()
        header = _header(x)
        works = [dist.isend(header, self.peer, group=self.control), dist.isend(x, self.peer, group=self.data),
                 dist.isend(metrics, self.peer, group=self.data)]
        self.outstanding.append((works, (header, x, metrics)))
        self.depth_sum += len(self.outstanding)

    def close(self) -> None:
        """Wait until the consumer holds every batch, then end the stream."""
        while self.outstanding:
            self._take_credit()
        dist.send(_header(None), self.peer, group=self.control)

    def _take_credit(self) -> None:
        dist.recv(self.credit, self.peer, group=self.control)
        works, _ = self.outstanding.popleft()
        for w in works:
            w.wait()


class Receiver:
    """Stage s <- s-1: yields (activation, upstream metrics) until the producer ends the stream."""

    def __init__(self, peer: int, n_metrics: int, device: torch.device, control: dist.ProcessGroup,
                 channel: str = DEFAULT):
        self.peer, self.n_metrics, self.device, self.control = peer, n_metrics, device, control
        self.data = control if channel == STAGED else None
        self.buffers = torch.device("cpu") if channel == STAGED else device   # where the tensors arrive
        self.header = torch.empty(HEADER, dtype=torch.int64)
        self.one = torch.ones(1, dtype=torch.int64)
        self.acks: deque[dist.Work] = deque()
        self.wait_s = 0.0       # blocked receiving: waiting for input

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            t0 = time.perf_counter()
            dist.recv(self.header, self.peer, group=self.control)
            ndim, dtype, *sizes = self.header.tolist()
            if ndim == END:
                break
            x = torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=self.buffers)
            metrics = torch.empty(self.n_metrics, dtype=torch.float64, device=self.buffers)
            dist.recv(x, self.peer, group=self.data)
            dist.recv(metrics, self.peer, group=self.data)
            x, metrics = x.to(self.device), metrics.to(self.device)
            self.wait_s += time.perf_counter() - t0
            self.acks.append(dist.isend(self.one, self.peer, group=self.control))
            while self.acks and self.acks[0].is_completed():
                self.acks.popleft()
            yield x, metrics
        for w in self.acks:
            w.wait()
