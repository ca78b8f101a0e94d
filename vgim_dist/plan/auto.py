"""``pipeline.stages: auto`` / ``pipeline.replicas: auto``: plan the layout at launch, before anything runs.

The profile comes from ``<run.dir>/plan/`` when this config, device and batch shape were measured before
(a resumed run plans the same layout), else it is measured here. The plan is written to
``<run.dir>/plan/plan.json`` and returned for the run's summary (and so MLflow).
"""

from __future__ import annotations

import copy
import json
import logging

import torch

from vgim_dist.config import Config, ConfigError
from vgim_dist.plan.planner import Plan, plan, rank, table
from vgim_dist.plan.profile import cached_profile, host_cores
from vgim_dist.run_dir import RunDir
from vgim_dist.train.stage import resolve_device

log = logging.getLogger(__name__)


def default_workers(gpus: int) -> int:
    """Workers a plan may use unless told: one per GPU, or one per CPU core."""
    return gpus or host_cores()


def plan_config(cfg: Config, workers: int = 0, gpus: int | None = None, refresh: bool = False,
                run_dir: RunDir | None = None) -> tuple[list[Plan], dict]:
    """Every layout for ``cfg`` on this machine's device, best first, and the profile they come from (as a dict).
    Parts of the layout that ``cfg`` fixes (stages, replicas, threads) stay as given."""
    device = resolve_device(cfg.run.device)         # profiled where the plan is made
    gpus = (torch.cuda.device_count() if device.type == "cuda" else 0) if gpus is None else gpus
    if gpus and device.type != "cuda":
        raise ConfigError(f"run.device: {cfg.run.device} profiles the modules on {device}, but {gpus} GPUs were "
                          "asked for; plan on a machine with the GPU, with run.device cuda or auto")
    if cfg.run.runner == "reference":
        workers = 1
    workers = workers or cfg.pipeline.workers or default_workers(gpus)
    # A pinned thread count is all that needs measuring.
    prof = cached_profile(cfg, device, refresh=refresh, threads=[cfg.run.threads] if cfg.run.threads else None,
                          run_dir=run_dir)
    p = cfg.pipeline
    pinned = {"stages": None if p.stages == "auto" else cfg.stage_modules(),
              "replicas": None if p.replicas == "auto" else (p.replicas or None),
              "replicate": p.replicas == "auto",
              "threads": cfg.run.threads or None}
    plans = rank(prof, workers, gpus, ray=cfg.run.runner == "pipeline", **pinned)
    if not plans:
        raise RuntimeError(f"plan: no layout of {len(cfg.model.modules)} modules fits {workers} workers"
                           + (f" on {gpus} GPUs" if gpus else "") + f" (profile: {prof.device_name})")
    return plans, {"profile": prof, "workers": workers, "gpus": gpus}


def resolve(cfg: Config, run_dir: RunDir | None = None) -> tuple[Config, dict | None]:
    """``cfg`` with ``auto`` stages/replicas replaced by the best plan, and that plan as a dict (None when
    nothing was ``auto``); its ``threads`` go into the resolved run (`vgim_dist.layout.resolve_run`)."""
    if not cfg.planned:
        return cfg, None
    run_dir = run_dir or RunDir.of(cfg)
    plans, ctx = plan_config(cfg, run_dir=run_dir)
    best, prof = plans[0], ctx["profile"]
    log.info("plan for %d workers%s:\n%s", ctx["workers"], f" on {ctx['gpus']} GPUs" if ctx["gpus"] else "",
             table(prof, plans))
    out = copy.deepcopy(cfg)
    out.pipeline.stages = [s.modules for s in best.stages]
    out.pipeline.replicas = [s.replicas for s in best.stages]
    if best.gpus_per_worker and not cfg.pipeline.gpus_per_stage and best.gpus_per_worker < 1:
        out.pipeline.gpus_per_stage = best.gpus_per_worker
    out.validate()
    record = {**best.to_dict(), "workers_allowed": ctx["workers"], "gpus": ctx["gpus"],
              "profile_cost_s": prof.cost_s, "device": f"{prof.device} ({prof.device_name})",
              "runners_up": [{"stages": [s.modules for s in p.stages], "replicas": [s.replicas for s in p.stages],
                              "threads": p.threads, "step_s": p.step_s, "bottleneck": p.bottleneck}
                             for p in plans[1:3]]}
    run_dir.write(run_dir.plan, json.dumps(record, indent=1).encode())
    return out, record


def replanner(cfg: Config, planned: dict | None, run_dir: RunDir | None = None):
    """How a pipeline re-plans after losing workers, for a run whose layout was planned at launch (``planned``,
    what `resolve` returned): the planner over the same measured profile, with the run's thread count pinned
    and no replicas added, so that the numbers do not change. None for a layout given by hand: the runner
    then merges stages its own way."""
    if planned is None:
        return None
    prof = cached_profile(cfg, resolve_device(cfg.run.device), threads=[cfg.run.threads],  # cached at launch
                          run_dir=run_dir)
    gpus = planned["gpus"]

    def replan(stages: list[list[int]], replicas: list[int], workers: int) -> tuple[list[list[int]], list[int]]:
        best = plan(prof, workers, min(gpus, workers), threads=cfg.run.threads, replicate=False)
        return [s.modules for s in best.stages], [s.replicas for s in best.stages]

    return replan
