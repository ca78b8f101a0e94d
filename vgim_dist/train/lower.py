"""A run that trains only the modules above K, with modules 0..K of another run loaded and frozen
(docs/latents.md): fed by latent shards (`vgim encode`: data.uri holds them, and the launch fills in
data.lower_* from their manifest), or by audio shards with the frozen modules run here over each whole
utterance (data.lower_run set, data.uri audio). Both give the module above the same input, to the bit, when
the shards hold float32: the crops are drawn alike (`data.latents.LatentCrops`) from the same frozen
outputs (`train.encoder.ChunkedEncoder`), and the sample taken alike (`data.latents.draw`).

The frozen modules' weights go into every checkpoint of the run (`CheckpointManager.freeze`), so that
probes, decoders and the report see the whole encoder.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from vgim_dist.config import Config, ConfigError, DataConfig, check_layout, from_dict
from vgim_dist.data.audio import SCALE
from vgim_dist.data.latents import LATENTS, LatentCrops, parts
from vgim_dist.data.loader import Split, read_manifest
from vgim_dist.data.source import BatchSource, build_source
from vgim_dist.data.store import Store
from vgim_dist.model import describe
from vgim_dist.run_dir import RunDir
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.encoder import ChunkedEncoder, load_encoder, run_config

# What fixes a module's shapes and weights' meaning: equal in the lower run for every frozen module.
ARCHITECTURE = ("channels", "batch_norm", "head_kernel", "variational")


def resolve_lower(cfg: Config) -> Config:
    """``cfg`` with data.lower_* filled in from latent shards at data.uri (or checked against them where given),
    and its frozen modules checked against the lower run's: their layers, and the model keys that shape them.
    One line naming the key on any mismatch."""
    d = cfg.data
    manifest = None if d.uri == "noise://" else read_manifest(Store(d.uri, d.endpoint_url))
    if manifest is not None and manifest.get("kind") == LATENTS:
        prov = manifest["provenance"]
        for key, theirs in (("lower_run", prov["run"]), ("lower_step", prov["step"]),
                            ("lower_module", prov["module"])):
            ours = getattr(d, key)
            if ours not in (theirs, DataConfig.__dataclass_fields__[key].default):
                raise ConfigError(f"data.{key}: {ours!r}, but the latent shards at data.uri={d.uri} come from "
                                  f"{theirs!r}; drop data.{key} (it is read from the shards)")
            setattr(d, key, theirs)
        lower = from_dict(Config, prov["config"])
        where = f"the latent shards at data.uri={d.uri} (made by {prov['run']})"
        recorded = CheckpointManager(RunDir(d.lower_run, d.endpoint_url)).files(d.lower_step)
        for name, want in prov["checkpoint"].items():
            if recorded.get(name, {}).get("xxh3_64") != want:
                raise ConfigError(f"data.uri: {where}: {name} of step {d.lower_step} is no longer the checkpoint "
                                  "they were made from; encode them again")
    elif d.lower_run:
        if manifest is None:
            raise ConfigError(f"data.uri: {d.uri} with data.lower_run: the frozen modules need audio shards (or "
                              "latent shards) to run on")
        lower = run_config(RunDir(d.lower_run, d.endpoint_url))
        where = f"data.lower_run={d.lower_run}"
    else:
        if not cfg.planned and (first := cfg.stage_modules()[0][0]) > 0:
            raise ConfigError(f"pipeline.stages: {cfg.pipeline.stages} start at module {first}, but data.uri="
                              f"{d.uri} holds audio; train from module 0, or from latent shards of module "
                              f"{first - 1} (vgim encode), or set data.lower_run and data.lower_module")
        return cfg
    k = d.lower_module
    if cfg.planned:
        raise ConfigError("pipeline.stages / pipeline.replicas: auto is not planned for a run with frozen lower "
                          f"modules ({where}); give the stages of modules {k + 1}..{len(cfg.model.modules) - 1}")
    if k >= len(cfg.model.modules) - 1:
        raise ConfigError(f"data.lower_module: {where} holds module {k}; model.modules has none above it to train")
    for key in ARCHITECTURE:
        if getattr(cfg.model, key) != getattr(lower.model, key):
            raise ConfigError(f"model.{key}: {getattr(cfg.model, key)!r}, but {where} has "
                              f"{getattr(lower.model, key)!r}; the frozen modules 0..{k} need the lower run's")
    for i in range(k + 1):
        if cfg.model.modules[i] != lower.model.modules[i]:
            raise ConfigError(f"model.modules.{i}: {dataclasses.asdict(cfg.model.modules[i])}, but {where} has "
                              f"{dataclasses.asdict(lower.model.modules[i])}; the frozen modules 0..{k} need the "
                              "lower run's")
    check_layout(cfg)
    return cfg


def frozen_weights(cfg: Config) -> dict[str, bytes]:
    """The lower run's weight files of the frozen modules, verified against their recorded checksums, by name:
    what every checkpoint of this run carries besides its own modules."""
    d = cfg.data
    if not d.lower_run:
        return {}
    ckpt = CheckpointManager(RunDir(d.lower_run, d.endpoint_url))
    return {f"module-{i}.safetensors": ckpt.read(d.lower_step, f"module-{i}.safetensors")
            for i in range(d.lower_module + 1)}


def train_source(data: DataConfig, seed: int) -> BatchSource:
    """The first trained module's batches: `data.source.build_source` (audio, noise, latent shards), or, with
    data.lower_run over audio shards, the frozen modules' outputs computed here (`frozen_source`)."""
    if data.lower_run and data.uri != "noise://":
        if read_manifest(Store(data.uri, data.endpoint_url)).get("kind") != LATENTS:
            return frozen_source(data, seed)
    return build_source(data, seed)


def frozen_source(data: DataConfig, seed: int) -> LatentCrops:
    """`LatentCrops` of the lower run's modules 0..data.lower_module run over each whole utterance of the
    audio shards at data.uri, in eval mode, as `vgim encode` runs them (mean and log-variance of a
    variational module)."""
    lower = run_config(RunDir(data.lower_run, data.endpoint_url))
    k = data.lower_module
    n_parts = parts(lower.model, k, "params")
    encoder = ChunkedEncoder(lower, load_encoder(lower, data.lower_step, RunDir(data.lower_run, data.endpoint_url),
                                                 upto=k), n_parts == 2, chunk=1 << 62)    # the whole utterance
    audio = Split(data.uri, data.split, data.endpoint_url, data.cache_dir)
    frames = np.array([describe(lower.model, int(n))[k]["frames"] for n in audio.length])
    keep = np.flatnonzero(frames >= 1)          # as `vgim encode` keeps them

    @functools.lru_cache(maxsize=16)     # a batch's utterances; module-0 latents of 15 s are 49 MB on vgim.yaml
    def latents(u: int) -> torch.Tensor:
        return encoder(torch.from_numpy(audio.pcm16(int(keep[u])).astype(np.float32) / SCALE))

    geometry = describe(lower.model, 1)[k]
    width = geometry["channels"] * n_parts
    return LatentCrops(data, seed, geometry["hop"], width, n_parts, frames[keep],
                       lambda u, offset, n: latents(u)[offset:offset + n])
