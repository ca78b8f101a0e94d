"""The reference runner: every stage in one process, in order. Its numbers define what a run means; the
pipeline runner drives the same Stage code and must end bitwise equal on CPU."""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed

from vgim_dist.config import Config
from vgim_dist.data.source import BatchSource, build_source
from vgim_dist.tracking.logger import StageLogger, stage_metrics
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import Interrupted, LoopPolicy
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.stage import Stage

log = logging.getLogger(__name__)


class ReferenceRunner:
    cfg: Config
    stages: list[Stage]
    source: BatchSource
    checkpoints: CheckpointManager
    metrics: MetricsLog
    loggers: list[StageLogger]      # one per stage (MLflow child runs); none without tracking

    def __init__(self, cfg: Config, device: torch.device, loggers: list[StageLogger] | None = None):
        self.cfg = cfg
        self._own_group = False
        if cfg.stage.engine == "deepspeed":
            from vgim_dist.parallel.deepspeed_engine import single_process_group  # noqa: PLC0415

            self._own_group = single_process_group()
        self.stages = [Stage(cfg, s, device) for s in range(len(cfg.stage_modules()))]
        self.source = build_source(cfg.data, cfg.seed)
        self.checkpoints = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.data.endpoint_url)
        self.metrics = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.data.endpoint_url)
        self.loggers = loggers or []
        self._stop = False

    def restore(self, start: int) -> None:
        """Load every stage's checkpoint at ``start`` (0: a fresh run, nothing to load)."""
        if start:
            for stage in self.stages:
                self.checkpoints.load_stage(stage, start)
            self.metrics.resume(start)
            log.info("resumed from step %d", start)

    def save(self, step: int) -> None:
        files = {}
        for stage in self.stages:
            files.update(self.checkpoints.save_stage(stage, step))
        self.checkpoints.commit(step, [i for s in self.stages for i in s.module_ids], files)
        self.metrics.flush()

    def run(self, start: int = 0) -> dict:
        """Train from checkpoint ``start`` (0: fresh) to ``run.steps``."""
        self.restore(start)
        policy = LoopPolicy(self.cfg, start, self.save)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        step = start
        try:
            while step < self.cfg.run.steps and not self._stop:
                x = self.source.batch(step)
                values: dict = {}
                for stage in self.stages:
                    x, m = stage.train_step(x)
                    values.update(m)
                step += 1
                policy.tick()
                if policy.should_log(step):
                    row = self.metrics.record(step, {**values, **policy.pace().metrics()})
                    for stage, logger in zip(self.stages, self.loggers):
                        logger.log(step, stage_metrics(row, stage.module_ids))
                policy.checkpoint(step)
            policy.checkpoint(step, last_step=True)
        finally:
            signal.signal(signal.SIGINT, previous)
            self.source.close()
            for logger in self.loggers:
                logger.close()
            if self._own_group:
                torch.distributed.destroy_process_group()
        if self._stop and step < self.cfg.run.steps:
            raise Interrupted(f"stopped at step {step}; checkpoint saved, continue with --resume")
        return {"steps": step, "final": self.metrics.rows[-1] if self.metrics.rows else {}}

    def _on_sigint(self, signum, frame) -> None:
        # Finish the step in flight so that every stage stops at the same step, then checkpoint.
        self._stop = True
