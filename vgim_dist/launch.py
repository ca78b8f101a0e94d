"""The training entry point: decide where the run starts, prepare the run directory, start the chosen runner.

It sits above both runners (``train/`` and ``pipeline/``) and composes them with tracking.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import sys

import torch

from vgim_dist.config import Config, dump_config
from vgim_dist.errors import UserError
from vgim_dist.eval.monitor import ProbeMonitor
from vgim_dist.layout import Hardware, ResolvedRun, resolve_run
from vgim_dist.model import describe
from vgim_dist.plan.auto import replanner, resolve as resolve_plan
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import absolute_uri
from vgim_dist.tracking import StageLogger
from vgim_dist.tracking.tracker import RunTracker, move_credentials_to_env
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.encoder import load_encoder
from vgim_dist.train.loop import Interrupted
from vgim_dist.train.lower import resolve_lower
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.stage import configure_torch, resolve_device

log = logging.getLogger(__name__)


def check_inputs(cfg: Config) -> RunDir:
    """What a run needs before it starts, each failure naming its key: frames enough for InfoNCE, a run
    directory and shards it can reach (S3 credentials included). The run directory, reached."""
    for r in describe(cfg.model, cfg.data.crop):
        if r["frames"] <= cfg.model.prediction_steps:
            need = next(n for n in range(cfg.data.crop, 100 * cfg.data.crop + 1, 160)
                        if describe(cfg.model, n)[r["module"]]["frames"] > cfg.model.prediction_steps)
            raise UserError(f"module {r['module']} emits {r['frames']} frames for data.crop = {cfg.data.crop} "
                            f"samples; InfoNCE needs more than model.prediction_steps = "
                            f"{cfg.model.prediction_steps}", "data.crop",
                            f"set data.crop to at least {need}, or lower model.prediction_steps")
    try:
        run_dir = RunDir.of(cfg)
        run_dir.exists(run_dir.root)
    except Exception as e:
        raise UserError(f"cannot reach the run directory: {type(e).__name__}: {str(e).splitlines()[0]}",
                        f"run.dir={cfg.run.dir}", _store_hint(cfg.run.dir)) from e
    if cfg.data.uri != "noise://":
        from vgim_dist.data.loader import read_manifest  # noqa: PLC0415
        from vgim_dist.data.store import Store, StoreError  # noqa: PLC0415

        try:
            read_manifest(Store(cfg.data.uri, cfg.data.endpoint_url))
        except StoreError as e:
            raise UserError(str(e), f"data.uri={cfg.data.uri}", _store_hint(cfg.data.uri)) from e
    resolve_lower(cfg)      # latent shards at data.uri, or data.lower_run: the frozen modules, checked
    return run_dir


def _store_hint(uri: str) -> str:
    if uri.startswith("s3://"):
        return ("check the bucket, data.endpoint_url, and the S3 credentials (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    return "check the path; shards come from `vgim data prepare`"


def start_step(cfg: Config, run_dir: RunDir, resume: bool) -> int:
    """The step the run starts from, decided before anything is written: 0 for a new run; with ``resume``, the
    newest intact committed checkpoint (0 if the run stopped before its first). Refuses a run directory that
    holds checkpoints without ``resume``, and ``resume`` of a run directory that holds no run."""
    checkpoints = CheckpointManager(run_dir)
    latest = checkpoints.latest()
    if not resume:
        if latest is not None:
            raise FileExistsError(f"the run directory already holds checkpoints up to step {latest} "
                                  f"(run.dir={cfg.run.dir}); pass --resume to continue it, or choose another run.dir")
        return 0
    if latest is None:
        if not run_dir.exists(run_dir.config):
            raise FileNotFoundError(f"--resume: run.dir {cfg.run.dir} holds no run (no config.yaml, no "
                                    "checkpoint); check run.dir, or drop --resume to start a new run")
        log.warning("--resume: no checkpoint under %s yet, starting at step 0", cfg.run.dir)
        return 0
    return checkpoints.newest_intact()


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its local paths absolute: a Ray worker's working directory is its session folder, not
    the user's, so every process of a run must get the paths as the driver resolves them."""
    cfg = copy.deepcopy(cfg)
    cfg.run.dir = absolute_uri(cfg.run.dir)
    cfg.data.uri = absolute_uri(cfg.data.uri)
    cfg.data.lower_run = absolute_uri(cfg.data.lower_run)
    cfg.data.cache_dir = absolute_uri(cfg.data.cache_dir)
    cfg.tracking.uri = absolute_uri(cfg.tracking.uri)
    cfg.eval.data = absolute_uri(cfg.eval.data)
    return cfg


def resolve(cfg: Config, run_dir: RunDir) -> tuple[Config, ResolvedRun, dict | None]:
    """The resolution phase: ``cfg`` planned (``auto`` stages or replicas) and laid out on its hardware, once,
    and logged; the config gets the run's thread count, part of its numbers (config.yaml records it). A
    pipeline's CPUs and GPUs per worker are placed when its runner has joined the Ray cluster."""
    cfg, plan = resolve_plan(cfg, run_dir)      # pipeline.stages / replicas: auto -> a plan for this hardware
    here = None
    if cfg.run.runner == "reference":   # a pipeline trains on its workers' devices (a head may have no GPU)
        device = resolve_device(cfg.run.device)
        here = Hardware(os.cpu_count() or 1, torch.cuda.device_count() if device.type == "cuda" else 0,
                        torch.get_num_threads())
    run = resolve_run(cfg, here, plan["threads"] if plan else 0)
    cfg.run.threads = run.threads
    log.info("resolved: %s", run.describe())
    return cfg, run, plan


def train(cfg: Config, resume: bool = False, address: str = "") -> dict:
    """Train ``cfg`` to ``run.steps`` and return the run summary (also ``<run.dir>/summary.json``), which
    names the run directory (absolute) and the thread count of each stage.
    ``address``: the Ray cluster a pipeline joins (default: a submitted job's, else one started here)."""
    cfg = absolute_paths(cfg)
    move_credentials_to_env(cfg)   # before the config is written, logged or sent to a worker
    run_dir = check_inputs(cfg)    # a bad value or an unreachable store, named, before anything is written
    start = start_step(cfg, run_dir, resume)
    cfg, run, plan = resolve(cfg, run_dir)      # decided once; everything below only reads it
    device = torch.device(run.device) if cfg.run.runner == "reference" else cfg.run.device
    if cfg.run.runner == "reference":
        configure_torch(cfg.run, device)
    rows = describe(cfg.model, cfg.data.crop)
    run_dir.write(run_dir.config, dump_config(cfg).encode())
    CheckpointManager(run_dir).claim(resume)  # the run's identity

    log.info("deterministic %s, torch %s, python %s; batch %d x %d samples, %d steps", cfg.run.deterministic,
             torch.__version__, platform.python_version(), cfg.data.batch_size, cfg.data.crop, cfg.run.steps)
    for r in rows:
        log.info("module %d: %.2f M params, %d x %d out, hop %d, receptive field %d", r["module"],
                 r["params"] / 1e6, r["channels"], r["frames"], r["hop"], r["receptive_field"])
    log.info("total %d trainable parameters", sum(r["params"] for r in rows))

    tracker = RunTracker.start(cfg, resume, run_dir)
    monitor = ProbeMonitor(cfg, tracker.parent_ref()) if cfg.eval.every else None  # probes while training
    with tracker:  # a job that raises ends its MLflow runs FAILED or KILLED instead of leaving them RUNNING
        try:
            if cfg.run.runner == "pipeline":
                from vgim_dist.pipeline.runner import PipelineRunner  # noqa: PLC0415 - Ray only when asked for

                if not sys.stderr.isatty():   # Ray colours its workers' log prefixes: not in a log file
                    os.environ.setdefault("RAY_COLOR_PREFIX", "0")

                refs = [tracker.stage_ref(s) for s in range(len(cfg.stage_modules()))]
                summary = PipelineRunner(cfg, refs, address, replanner(cfg, plan, run_dir), monitor,
                                         run_dir).run(start)
            else:
                from vgim_dist.train.reference import ReferenceRunner  # noqa: PLC0415

                loggers = [StageLogger(tracker.stage_ref(s)) for s in range(len(cfg.stage_modules()))]
                summary = ReferenceRunner(cfg, device, loggers, monitor, run_dir).run(start)
        except Interrupted:
            tracker.end("KILLED")   # resumable
            raise
        summary = {"run_dir": cfg.run.dir, "runner": cfg.run.runner, "stages": cfg.stage_modules(),
                   "threads": cfg.run.threads, "deterministic": cfg.run.deterministic, **summary}
        if plan:
            summary["plan"] = plan
        run_dir.write(run_dir.summary, json.dumps(summary, indent=1).encode())
        if tracker.enabled:
            step = summary["steps"]
            history = MetricsLog(run_dir, cfg.run.steps)
            history.resume(step)
            tracker.finish(summary, history.rows, lambda: load_encoder(cfg, step, run_dir))
    return summary
