"""Latent shards (`vgim encode`, docs/latents.md): what their manifest says and how a row's bytes are laid out.

A row's ``latent`` is a (frames, width) array in the manifest's ``dtype``, little-endian, frame-major. Its
width is ``channels`` times the number of ``parts``: ``["mean", "logvar"]`` side by side for a variational
Gaussian module stored with ``--what params``, else ``["mean"]`` (the output the run's probes see: the
Gaussian's mean, a GIM module's output, a GRU's output).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vgim_dist.config import ConfigError, DataConfig, ModelConfig
from vgim_dist.data.loader import Split, crop_plan, eligible
from vgim_dist.seeding import derive_seed

LATENTS = "latents"     # a manifest's "kind"; audio manifests have none
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parts(model: ModelConfig, module: int, what: str) -> int:
    """How many arrays of ``channels`` a row of module ``module`` holds: 2 (mean, log-variance) for
    ``what="params"`` on a variational Gaussian module, else 1."""
    spec = model.modules[module]
    return 2 if what == "params" and model.variational and spec.layers and not spec.autoregressor else 1


def row_array(data: bytes | np.ndarray, dtype: str, width: int) -> torch.Tensor:
    """A row's ``latent`` bytes (or a whole-frame slice of them) as a float32 (frames, width) tensor."""
    return torch.from_numpy(np.array(np.frombuffer(data, np.uint8))).view(DTYPES[dtype]).view(-1, width).float()


def draw(params: torch.Tensor, parts: int, seed: int, step: int) -> torch.Tensor:
    """The input of the module above from a batch of stored rows (B, width, frames): with mean and
    log-variance (``parts`` 2) a sample of the Gaussian, as the module below hands one on in the pipeline
    (mu + sigma * noise, the noise a pure function of (seed, step)); else the rows themselves."""
    if parts == 1:
        return params
    mu, logvar = params.chunk(2, dim=1)
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(derive_seed(seed, "latents", step)))
    return mu + torch.exp(0.5 * logvar) * noise


class LatentCrops:
    """Training batches from a frozen module's outputs over whole utterances, a pure function of (seed, step):
    crops of ``data.crop / hop`` frames starting at multiples of ``data.grid / hop`` frames, drawn as audio
    crops are (`loader.crop_plan`), then `draw`. ``rows(u, offset, n)`` gives row u's frames offset..offset+n
    (fewer at its end) as float32 (frames, width); ``length`` the rows' frame counts."""

    def __init__(self, cfg: DataConfig, seed: int, hop: int, width: int, parts: int, length: np.ndarray,
                 rows: Callable[[int, int, int], torch.Tensor]):
        for key, value in (("data.crop", cfg.crop), ("data.grid", cfg.grid)):
            if value % hop:
                raise ConfigError(f"{key}: {value} samples is not a whole number of the latents' {hop}-sample "
                                  f"frames; use a multiple of {hop}")
        self.cfg, self.seed, self.width, self.parts = cfg, seed, width, parts
        self.crop, self.grid = cfg.crop // hop, cfg.grid // hop
        self.length, self.rows = length, rows
        self.eligible = eligible(length, self.crop, cfg.short)
        if len(self.eligible) == 0:
            raise ValueError(f"no utterance in split {cfg.split!r} of {cfg.uri} is {self.crop} frames long; use "
                             "data.short=pad or a smaller data.crop")

    def batch(self, step: int) -> torch.Tensor:
        out = torch.zeros(self.cfg.batch_size, self.crop, self.width)
        for row, u, off in zip(out, *crop_plan(self.seed, step, self.eligible, self.length, self.cfg.batch_size,
                                                self.crop, self.grid)):
            clip = self.rows(int(u), int(off), self.crop)
            row[:len(clip)] = clip
        return draw(out.transpose(1, 2).contiguous(), self.parts, self.seed, step)

    def close(self) -> None:
        pass


def latent_source(cfg: DataConfig, seed: int, manifest: dict) -> LatentCrops:
    """`LatentCrops` over the latent shards at ``cfg.uri`` (``manifest`` is theirs)."""
    split = Split(cfg.uri, cfg.split, cfg.endpoint_url, cfg.cache_dir, column="latent", length_column="frames")
    width, dtype = manifest["channels"] * len(manifest["parts"]), manifest["dtype"]
    frame = width * DTYPES[dtype].itemsize

    def rows(u: int, offset: int, n: int) -> torch.Tensor:
        return row_array(split.row(u)[offset * frame:(offset + n) * frame], dtype, width)

    return LatentCrops(cfg, seed, manifest["hop"], width, len(manifest["parts"]), split.length, rows)
