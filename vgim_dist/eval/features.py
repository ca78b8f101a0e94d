"""Frozen features of a trained run: the encoder from ``config.yaml`` and a checkpoint, in eval mode, under
no_grad, applied to every utterance of a split in a fixed order.

docs/method.md, published-code defects 1-3: evaluation never runs in train mode (BatchNorm statistics stay
those of training), never builds a graph through the encoder, and sees the whole split, unshuffled, with no
batch dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from vgim_dist.config import Config
from vgim_dist.data.latents import LATENTS
from vgim_dist.data.loader import Utterance, iter_utterances, read_manifest
from vgim_dist.data.store import Store
from vgim_dist.model import GreedyModule, describe
from vgim_dist.run_dir import RunDir
from vgim_dist.seeding import derive_seed
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.encoder import initial_encoder, load_encoder, run_config

FeatureMode = Literal["mean", "sample"]  # mu of each Gaussian module, or one draw from N(mu, sigma^2)
Reduce = Literal["mean", "max", "flatten"]  # over time: average, maximum, or none (the C x T output flattened)


@dataclass
class Run:
    """A trained run, frozen: its config, the checkpoint step used, and its modules in eval mode."""

    dir: str
    cfg: Config
    step: int
    modules: list[GreedyModule]

    @property
    def name(self) -> str:
        return Path(self.dir.rstrip("/")).name

    def hop(self, module: int) -> int:
        """Input samples per output frame of ``module``."""
        return describe(self.cfg.model, self.cfg.data.crop)[module]["hop"]

    def check_module(self, module: int) -> None:
        if not 0 <= module < len(self.modules):
            raise ValueError(f"{self.dir}: module {module} does not exist; the run has modules "
                             f"0..{len(self.modules) - 1}")

    def encode(self, x: torch.Tensor, upto: int, mode: FeatureMode = "mean",
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Waveform (B, 1, T) -> the output of modules 0..upto, each (B, C_m, T_m).

        With ``mode="sample"`` each Gaussian module passes its sample on, as in training; otherwise mu."""
        outs = []
        for m in self.modules[: upto + 1]:
            x = m.encode(x, deterministic=mode == "mean", generator=generator)
            outs.append(x)
        return outs


def load_run(run_dir: str, step: int | None = None) -> Run:
    """The run in ``run_dir`` at checkpoint ``step`` (default: the latest complete one), frozen.

    Step 0 is the encoder as training initialised it (the same seeded build), whether or not a step-0
    checkpoint exists: the baseline that shows what training bought."""
    if "://" in run_dir:
        raise ValueError(f"{run_dir}: evaluation reads and writes a local run directory; copy the run here first")
    cfg = run_config(RunDir(run_dir))
    steps = CheckpointManager(run_dir).steps()
    if step == 0 and 0 not in steps:
        encoder = initial_encoder(cfg)
        encoder.requires_grad_(False)
        return Run(run_dir, cfg, 0, list(encoder.stack))
    if not steps:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {run_dir}/checkpoints")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint for step {step}; it has {steps}")
    encoder = load_encoder(cfg, step)  # eval mode
    encoder.requires_grad_(False)
    return Run(run_dir, cfg, step, list(encoder.stack))


def audio_uri(cfg: Config) -> str:
    """The audio shards a run trained on: data.uri, or, for a run from latent shards, the audio they were
    encoded from (their manifest's source)."""
    if cfg.data.uri == "noise://":
        return cfg.data.uri
    manifest = read_manifest(Store(cfg.data.uri, cfg.data.endpoint_url))
    return manifest["source"]["uri"] if manifest.get("kind") == LATENTS else cfg.data.uri


def split_rule(uri: str, endpoint_url: str = "") -> str:
    """How the shards at ``uri`` were split (docs/method.md, published-code defect 6: every result says which
    split it used)."""
    corpus = read_manifest(Store(uri, endpoint_url)).get("corpus", {})
    return f"{corpus.get('format', '?')}/{corpus.get('level', '-')}/{corpus.get('split_rule', '?')}"


def _batches(utts: Iterator[Utterance], batch_size: int) -> Iterator[list[Utterance]]:
    """Consecutive utterances of equal length, at most ``batch_size`` at a time; the order is kept."""
    batch: list[Utterance] = []
    for u in utts:
        if batch and (len(batch) == batch_size or len(u.audio) != len(batch[0].audio)):
            yield batch
            batch = []
        batch.append(u)
    if batch:
        yield batch


@dataclass
class SplitFeatures:
    """Features of every utterance of a split, in the loader's fixed order."""

    utterances: list[Utterance]      # audio dropped (empty arrays) once encoded
    pooled: list[torch.Tensor]       # per module: (N, C_m), the output averaged over time
    vectors: list[torch.Tensor]      # per module: (N, D) as ``reduce`` asked: mean or max (D = C_m), flatten (C_m T_m)
    frames: list[list[torch.Tensor]] | None  # per module, per utterance: (T_m, C_m); only when asked for


def extract(run: Run, uri: str, split: str, upto: int, mode: FeatureMode = "mean", seed: int = 0,
            keep_frames: bool = False, batch_size: int = 64, endpoint_url: str = "",
            cache_dir: str = "", reduce: Reduce = "mean") -> SplitFeatures:
    """Encode every utterance of ``split`` through modules 0..upto; each module's output averaged over time,
    and reduced over time as ``reduce`` says (``flatten`` needs clips of one length, as padded syllables are).

    Sampled features draw from one generator seeded by (seed, split), consumed in the fixed utterance
    order, so the same call gives the same numbers."""
    run.check_module(upto)
    gen = torch.Generator().manual_seed(derive_seed(seed, "features", split))
    utts: list[Utterance] = []
    pooled: list[list[torch.Tensor]] = [[] for _ in range(upto + 1)]
    vectors: list[list[torch.Tensor]] = [[] for _ in range(upto + 1)]
    frames: list[list[torch.Tensor]] = [[] for _ in range(upto + 1)]
    with torch.no_grad():
        for batch in _batches(iter_utterances(uri, split, endpoint_url, cache_dir), batch_size):
            x = torch.stack([torch.from_numpy(u.audio) for u in batch]).unsqueeze(1)   # (B, 1, T)
            for m, z in enumerate(run.encode(x, upto, mode, gen)):                     # z: (B, C_m, T_m)
                pooled[m].append(z.mean(dim=2))
                if reduce == "max":
                    vectors[m].append(z.amax(dim=2))
                elif reduce == "flatten":
                    if vectors[m] and vectors[m][0].shape[1] != z[0].numel():
                        raise ValueError(f"{uri}: --features flatten needs clips of one length; {batch[0].id} "
                                         f"gives {z.shape[2]} frames, earlier clips another number")
                    vectors[m].append(z.flatten(1))
                if keep_frames:
                    frames[m] += list(z.transpose(1, 2))
            utts += [Utterance(u.id, u.speaker, u.labels, u.audio[:0]) for u in batch]
    if not utts:
        raise ValueError(f"{uri}: split {split!r} has no utterances")
    means = [torch.cat(p) for p in pooled]
    return SplitFeatures(utts, means, means if reduce == "mean" else [torch.cat(v) for v in vectors],
                         frames if keep_frames else None)
