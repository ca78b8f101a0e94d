"""The training entry point: resolve the config, prepare the run directory, start the chosen runner."""

from __future__ import annotations

import copy
import json
import logging
import platform

import torch

from vgim_dist.config import Config, dump_config
from vgim_dist.model import describe
from vgim_dist.storage import absolute_uri, open_dir, write_bytes
from vgim_dist.tracking import RunTracker, StageLogger
from vgim_dist.train.stage import configure_torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device: cuda requested but no CUDA device is visible")
    return torch.device(name)


def resolve(cfg: Config) -> Config:
    """The config every process of the run gets, decided here before anything starts (and recorded in
    config.yaml): local paths absolute, and the torch thread count of each stage's process."""
    cfg = copy.deepcopy(cfg)
    cfg.run.dir = absolute_uri(cfg.run.dir)
    cfg.data.uri = absolute_uri(cfg.data.uri)
    cfg.data.cache_dir = absolute_uri(cfg.data.cache_dir)
    cfg.tracking.uri = absolute_uri(cfg.tracking.uri)
    if not cfg.run.threads:
        # A pipeline worker: the whole CPUs it reserves, at least one (what Ray would give it); the reference
        # runner: this process's default.
        pipeline = cfg.run.runner == "pipeline"
        cfg.run.threads = max(1, int(cfg.pipeline.cpus_per_stage)) if pipeline else torch.get_num_threads()
    return cfg


def train(cfg: Config, resume: bool = False) -> dict:
    """Train ``cfg`` to ``run.steps`` and return the run summary (also ``<run.dir>/summary.json``), which
    names the run directory (absolute) and the thread count each stage used."""
    cfg = resolve(cfg)
    # A pipeline trains on its workers' devices (a cluster's head may have no GPU); the reference trains here.
    device = resolve_device(cfg.run.device) if cfg.run.runner == "reference" else cfg.run.device
    if cfg.run.runner == "reference":
        configure_torch(cfg.run, device)
    fs, root = open_dir(cfg.run.dir, cfg.data.endpoint_url)
    write_bytes(fs, f"{root}/config.yaml", dump_config(cfg).encode())

    rows = describe(cfg.model, cfg.data.crop)
    for r in rows:
        if r["frames"] <= cfg.model.prediction_steps:
            raise ValueError(f"module {r['module']} emits {r['frames']} frames for data.crop = {cfg.data.crop} "
                             f"samples; InfoNCE needs more than model.prediction_steps = "
                             f"{cfg.model.prediction_steps}")
    log.info("device %s, %d threads per stage, deterministic %s, torch %s, python %s", device, cfg.run.threads,
             cfg.run.deterministic, torch.__version__, platform.python_version())
    log.info("stages %s, batch %d x %d samples, %d steps", cfg.stage_modules(), cfg.data.batch_size,
             cfg.data.crop, cfg.run.steps)
    for r in rows:
        log.info("module %d: %.2f M params, %d x %d out, hop %d, receptive field %d", r["module"],
                 r["params"] / 1e6, r["channels"], r["frames"], r["hop"], r["receptive_field"])
    log.info("total %d trainable parameters", sum(r["params"] for r in rows))

    tracker = RunTracker.start(cfg, resume)
    with tracker:  # a job that raises ends its MLflow runs FAILED or KILLED instead of leaving them RUNNING
        if cfg.run.runner == "pipeline":
            from vgim_dist.pipeline.runner import PipelineRunner  # noqa: PLC0415 - Ray only when asked for

            refs = [tracker.stage_ref(s) for s in range(len(cfg.stage_modules()))]
            summary = PipelineRunner(cfg, refs).run(resume)
        else:
            from vgim_dist.train.reference import ReferenceRunner  # noqa: PLC0415

            loggers = [StageLogger(tracker.stage_ref(s)) for s in range(len(cfg.stage_modules()))]
            summary = ReferenceRunner(cfg, device, loggers).run(resume)
        summary = {"run_dir": cfg.run.dir, "runner": cfg.run.runner, "stages": cfg.stage_modules(),
                   "threads": cfg.run.threads, "deterministic": cfg.run.deterministic, **summary}
        write_bytes(fs, f"{root}/summary.json", json.dumps(summary, indent=1).encode())
        tracker.finish(summary)
    return summary
