"""A run resolved once, before it starts (docs/architecture.md): the config plus the hardware it runs on (plus
the plan, when ``pipeline.stages`` or ``pipeline.replicas`` is ``auto``) give a `ResolvedRun`: stages,
replicas, threads, CPUs and GPUs per worker, the device. Everything after resolution only reads it.

Every rule a layout must obey is checked by one validator, `vgim_dist.config.check_layout`, whoever asks:
the config, the planner's result, a re-plan, a worker's topology.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vgim_dist.config import Config, ConfigError, check_layout


@dataclass(frozen=True)
class Hardware:
    """What a run's stages run on: the CPUs and GPUs of this machine (the reference runner) or of the Ray
    cluster (a pipeline's workers), and this process's default torch thread count."""

    cpus: float
    gpus: float
    default_threads: int = 1


@dataclass(frozen=True)
class ResolvedRun:
    """How a run is laid out on its hardware, decided once by `resolve_run`."""

    runner: str
    stages: list[list[int]]     # module indices per stage
    replicas: list[int]         # workers per stage
    threads: int                # torch threads of each stage's process
    cpus_per_worker: float      # CPUs each pipeline worker reserves
    gpus_per_worker: float      # GPU share of each pipeline worker; 0: none
    device: str                 # where the stages train: cpu or cuda (run.device until placed)
    cpus_per_stage: float = 0.0     # pipeline.cpus_per_stage: asked for; 0 = an equal share, at most one
    gpus_per_stage: float = 0.0     # pipeline.gpus_per_stage: asked for; 0 = a whole GPU

    def placed(self, hw: Hardware) -> ResolvedRun:
        """This run on ``hw``: CPUs per worker as `worker_cpus` says; a GPU share per worker
        (``pipeline.gpus_per_stage``, default a whole one) when it trains on GPUs: run.device cuda, or auto
        where ``hw`` has GPUs."""
        if self.device == "cuda" and not hw.gpus:
            raise RuntimeError("run.device: cuda requested but the Ray cluster has no GPU")
        use_gpu = self.device == "cuda" or (self.device == "auto" and hw.gpus > 0)
        gpus = (self.gpus_per_stage or 1.0) if use_gpu else 0.0
        if self.runner == "pipeline" and self.workers * gpus > hw.gpus + 1e-9:
            raise RuntimeError(f"pipeline: {self.workers} workers x {gpus:g} GPU each need {self.workers * gpus:g} "
                               f"GPUs, the Ray cluster has {hw.gpus:g}; set pipeline.gpus_per_stage to at most "
                               f"{hw.gpus / self.workers:.3g} to share them, or plan with pipeline.stages: auto")
        cpus = (worker_cpus(self.threads, self.cpus_per_stage, hw.cpus or 1.0, self.workers)
                if self.runner == "pipeline" else self.cpus_per_stage or min(1.0, (hw.cpus or 1.0) / self.workers))
        return dataclasses.replace(self, cpus_per_worker=cpus, gpus_per_worker=gpus,
                                   device="cuda" if use_gpu else "cpu")

    @property
    def workers(self) -> int:
        return sum(self.replicas)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def resources(self) -> dict[str, float]:
        """What each pipeline worker asks Ray for."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def describe(self) -> str:
        where = (f", {self.cpus_per_worker:.2g} CPUs{f' + {self.gpus_per_worker:g} GPU' if self.use_gpu else ''} "
                 f"per worker" if self.runner == "pipeline" else "")
        return (f"{self.runner} runner: stages {self.stages}, replicas {self.replicas}, {self.threads} threads per "
                f"stage, device {self.device}{where}")


def worker_cpus(threads: int, given: float, cluster_cpus: float, workers: int) -> float:
    """CPUs each of ``workers`` pipeline workers reserves on a cluster of ``cluster_cpus``, so that its ``threads``
    torch threads never outnumber them. The threads of one operator meet at a barrier, so a thread that loses
    its core to another process stalls its siblings: two threads on a core that a third process also wants run
    several times slower (docs/performance.md). Hence:

    - ``given`` (``pipeline.cpus_per_stage``): ``threads`` above it (or above 1, for a fraction) is refused,
      naming both numbers;
    - else each worker reserves ``threads`` CPUs when that is more than one, else its equal share of the
      cluster's, at most one. A share below one CPU (more one-thread workers than cores) is the one way workers
      share cores: a process has at least one thread, and the planner charges the sharing
      (docs/planning.md). Workers that together need more CPUs than the cluster has are refused, instead of
      waiting for CPUs that never come."""
    if given:
        if threads > max(1.0, given):
            raise ConfigError(f"run.threads = {threads} exceeds pipeline.cpus_per_stage = {given:g}: each worker "
                              f"would run {threads} torch threads on the {given:g} CPUs Ray reserves for it; set "
                              f"pipeline.cpus_per_stage to at least {threads}, or run.threads to at most "
                              f"{max(1, int(given))} (0: one per reserved CPU)")
        return given
    if threads == 1:
        return min(1.0, cluster_cpus / workers)
    if workers * threads > cluster_cpus + 1e-9:
        raise ConfigError(f"run.threads = {threads}: {workers} workers x {threads} threads need {workers * threads} "
                          f"CPUs, the Ray cluster has {cluster_cpus:g}; set run.threads to at most "
                          f"{max(1, int(cluster_cpus // workers))}, or use fewer workers (pipeline.stages, "
                          "pipeline.replicas)")
    return float(threads)


def resolve_run(cfg: Config, hw: Hardware | None, planned_threads: int = 0) -> ResolvedRun:
    """The layout of ``cfg`` (planned already, if it was ``auto``) on ``hw``: this machine for the reference
    runner; for a pipeline, None until the runner has joined its Ray cluster, which then `ResolvedRun.placed`
    it. ``planned_threads``: the plan's thread count, if one was made.

    Threads: ``run.threads``, else the plan's, else a pipeline worker's whole reserved CPUs (at least one, what
    Ray itself would give it) or the reference runner's default (torch's: the cores)."""
    check_layout(cfg)
    pipeline = cfg.run.runner == "pipeline"
    default = max(1, int(cfg.pipeline.cpus_per_stage)) if pipeline else (hw.default_threads if hw else 1)
    run = ResolvedRun(cfg.run.runner, cfg.stage_modules(), cfg.stage_replicas(),
                      cfg.run.threads or planned_threads or default, 0.0, 0.0, cfg.run.device,
                      cfg.pipeline.cpus_per_stage, cfg.pipeline.gpus_per_stage)
    return run.placed(hw) if hw else run
