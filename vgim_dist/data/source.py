"""Batch sources: training batches as a pure function of (seed, step)."""

from __future__ import annotations

from typing import Protocol

import torch

from vgim_dist.config import DataConfig
from vgim_dist.seeding import derive_seed


class BatchSource(Protocol):
    def batch(self, step: int) -> torch.Tensor:
        """Training batch for ``step``: float32 (B, 1, crop) in [-1, 1]; equal for equal (seed, step)."""

    def close(self) -> None: ...


class NoiseSource:
    """Seeded random audio-like batches: for tests and benchmarks that need no corpus."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "noise", step))
        x = torch.randn(self.cfg.batch_size, 1, self.cfg.crop, generator=g) * 0.1
        return x.clamp_(-1.0, 1.0)

    def close(self) -> None:
        pass


def build_source(cfg: DataConfig, seed: int) -> BatchSource:
    if cfg.uri == "noise://":
        return NoiseSource(cfg, seed)
    from vgim_dist.data.latents import LATENTS, latent_source  # noqa: PLC0415 - heavy deps only for shards
    from vgim_dist.data.loader import ShardSource, read_manifest  # noqa: PLC0415
    from vgim_dist.data.store import Store  # noqa: PLC0415

    manifest = read_manifest(Store(cfg.uri, cfg.endpoint_url))
    if manifest.get("kind") == LATENTS:     # a frozen module's outputs: the input of the module above it
        return latent_source(cfg, seed, manifest)
    return ShardSource(cfg, seed)
