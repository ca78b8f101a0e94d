"""The trained encoder as one nn.Module, rebuilt from a checkpoint so that any runner's run can be exported."""

from __future__ import annotations

import torch
from torch import nn

from vgim_dist.config import Config
from vgim_dist.model import GreedyModule, build_module
from vgim_dist.train.checkpoint import CheckpointManager


class Encoder(nn.Module):
    """Every greedy module in order, in eval mode: waveform (B, 1, T) -> the last module's features
    (mu of a Gaussian module, the GRU output of an autoregressor), as `GreedyModule.encode` gives them."""

    def __init__(self, modules: list[GreedyModule]):
        super().__init__()
        self.stack = nn.ModuleList(modules)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.stack:
            x = m.encode(x, deterministic=True)
        return x


def load_encoder(cfg: Config, step: int) -> Encoder:
    """The encoder of ``cfg``'s run at checkpoint ``step``, on the CPU."""
    ckpt = CheckpointManager(cfg.run.dir, endpoint_url=cfg.data.endpoint_url)
    modules = []
    for i in range(len(cfg.model.modules)):
        m = build_module(cfg.model, i, cfg.seed)
        prefix = f"module.{i}."
        m.load_state_dict({k[len(prefix):]: v for k, v in ckpt.load_weights(step, i).items()})
        modules.append(m)
    return Encoder(modules)
