"""Data-parallel replicas of one stage that together compute exactly the unreplicated stage's loss.

Each replica holds a contiguous slice of the batch. InfoNCE and BatchNorm are not per-example: negatives come
from the whole batch's frames and BatchNorm normalises with whole-batch statistics. So the replicas

- gather every replica's target frames into the full negative pool (autograd all_gather: gradients reach the
  frames' owners),
- draw noise, the InfoNCE window and the permutations for the full batch from identical generators and keep
  their own rows,
- normalise with statistics summed over the group (``GroupBatchNorm1d``),
- divide by the full batch size and SUM gradients across the group.

The sum of the replicas' partial losses is the unreplicated loss, so one replica on B rows and two on B/2
rows each take the same optimizer step up to floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def split_sizes(batch: int, replicas: int) -> list[int]:
    """Contiguous near-equal shares of ``batch`` rows, in batch order (earlier replicas take the remainder)."""
    base, extra = divmod(batch, replicas)
    return [base + (r < extra) for r in range(replicas)]


@dataclass
class Share:
    """One step's split of a batch over the replicas: this replica holds rows start .. start + sizes[rank]."""

    group: ReplicaGroup
    sizes: list[int]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def rows(self) -> slice:
        start = sum(self.sizes[:self.group.rank])
        return slice(start, start + self.sizes[self.group.rank])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every replica's ``x`` concatenated along dim 0 in batch order, with gradients flowing back."""
        return self.group.gather(x, self.sizes)


@dataclass
class ReplicaGroup:
    """This process's place among the replicas of one stage."""

    group: dist.ProcessGroup
    rank: int
    world: int

    def share(self, local: int, device: torch.device) -> Share:
        """This step's split, from the rows each replica holds (partial batches make them uneven)."""
        n = torch.tensor([local], device=device)
        out = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(out, n, group=self.group)
        return Share(self, [int(t) for t in out])

    def gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every replica's ``x`` along dim 0, in replica order, with gradients flowing back."""
        pad = max(sizes) - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        parts = dist_fn.all_gather(x, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, differentiably."""
        return dist_fn.all_reduce(x, group=self.group)

    def sum_gradients(self, module: nn.Module) -> None:
        """Sum parameter gradients over the group in one flat message."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


class GroupBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover every replica's rows (torch's SyncBatchNorm is GPU-only).

    Running statistics are updated exactly as BatchNorm1d does (unbiased variance), so checkpoints of
    replicated and unreplicated stages mean the same.
    """

    replicas: ReplicaGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.replicas is None:
            return super().forward(x)
        # Two passes (mean, then squared deviations): E[x^2] - mean^2 cancels badly when |mean| >> std.
        local = torch.cat([x.sum(dim=(0, 2)), x.new_tensor([x.shape[0] * x.shape[2]])])
        total = self.replicas.all_reduce(local)                       # (C + 1,)
        n = total[-1]
        mean = total[:-1] / n
        var = self.replicas.all_reduce((x - mean[None, :, None]).pow(2).sum(dim=(0, 2))) / n  # biased
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            self.num_batches_tracked.add_(1)
        y = (x - mean[None, :, None]) * torch.rsqrt(var + self.eps)[None, :, None]
        return y * self.weight[None, :, None] + self.bias[None, :, None]

    @classmethod
    def replace_in(cls, module: nn.Module, replicas: ReplicaGroup) -> None:
        """Swap every BatchNorm1d under ``module`` for a group-synchronised one with the same state."""
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm1d:
                sync = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                sync.load_state_dict(child.state_dict())
                sync.replicas = replicas
                setattr(module, name, sync.to(child.weight.device))
            else:
                cls.replace_in(child, replicas)
