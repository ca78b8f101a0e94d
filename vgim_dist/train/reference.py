"""The reference runner: every stage in one process, in order. Its numbers define what a run means; the
pipeline runner drives the same `StageLoop` and must end bitwise equal on CPU.

It is the single-process arrangement of the loop (docs/architecture.md): stage s's output is handed to stage
s + 1 in this process, the last stage's goes nowhere, and a checkpoint is committed here once every stage
has saved it.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading

import torch
import torch.distributed

from vgim_dist.config import Config
from vgim_dist.run_dir import RunDir
from vgim_dist.tracking.logger import StageLogger
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import MetricsLayout, StageLoop, check_finished
from vgim_dist.train.lower import frozen_weights
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.parts import Handoff, LocalCommit, Nowhere, SourceInput
from vgim_dist.train.stage import Stage

log = logging.getLogger(__name__)


class ReferenceRunner:
    cfg: Config
    stages: list[Stage]
    loops: list[StageLoop]          # one per stage, chained: each one's input is the one before's output
    checkpoints: CheckpointManager
    metrics: MetricsLog             # the last stage's loop writes the rows
    loggers: list[StageLogger]      # one per stage (MLflow child runs); none without tracking

    def __init__(self, cfg: Config, device: torch.device, loggers: list[StageLogger] | None = None,
                 monitor=None, run_dir: RunDir | None = None):
        self.cfg = cfg
        self._own_group = False
        if cfg.stage.engine == "deepspeed":
            from vgim_dist.parallel.deepspeed_engine import single_process_group  # noqa: PLC0415

            self._own_group = single_process_group()
        self.stages = [Stage(cfg, s, device) for s in range(len(cfg.stage_modules()))]
        run_dir = run_dir or RunDir.of(cfg)
        self.checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
        self.checkpoints.freeze(frozen_weights(cfg))
        self.metrics = MetricsLog(run_dir, cfg.run.steps)
        self.loggers = loggers or []
        self._stop = False
        commit = LocalCommit(self.checkpoints, [i for s in self.stages for i in s.module_ids], len(self.stages))
        layout = MetricsLayout.of(cfg, stats=False)     # one process: nobody waits for anyone
        inputs = SourceInput(cfg.data, cfg.seed, cfg.run.steps, torch.device(device), lambda: self._stop)
        self.loops = []
        for s, stage in enumerate(self.stages):
            last = s == len(self.stages) - 1
            output = Nowhere() if last else Handoff()
            self.loops.append(StageLoop(
                cfg, stage, inputs=inputs, output=output, commit=commit, checkpoints=self.checkpoints,
                layout=layout, metrics=self.metrics if last else None,
                tracking=self.loggers[s] if s < len(self.loggers) else None,
                # monitor: an unstarted `ProbeMonitor` (eval.every), fed the committed checkpoints
                monitor=functools.partial(monitor.start, "subprocess") if monitor and last else None))
            if not last:
                output.producer, inputs = self.loops[-1], output

    def restore(self, start: int) -> None:
        """Load every stage's checkpoint at ``start`` (0: a fresh run, nothing to load)."""
        for loop in self.loops:
            loop.restore(start)
        if start:
            log.info("resumed from step %d", start)

    def run(self, start: int = 0) -> dict:
        """Train from checkpoint ``start`` (0: fresh) to ``run.steps``."""
        self.restore(start)
        # Only the main thread may install handlers; a sweep's trial runs in a Ray Tune thread.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main else None
        try:
            step = self.loops[-1].run()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            for logger in self.loggers:
                logger.close()
            if self._own_group:
                torch.distributed.destroy_process_group()
        if self._stop:
            check_finished(step, self.cfg.run.steps)
        return {"steps": step, "final": self.metrics.rows[-1] if self.metrics.rows else {}}

    def _on_sigint(self, signum, frame) -> None:
        # Finish the step in flight so that every stage stops at the same step, then checkpoint.
        self._stop = True
