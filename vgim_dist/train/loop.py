"""One stage loop, driven by both runners (docs/architecture.md).

A `StageLoop` trains one `Stage`: it takes each step's input from its `Input`, trains on it, hands the output
and the metrics gathered so far to its `Output`, logs on the log steps and checkpoints through its `Commit`.
What it is plugged into is the arrangement's choice, not the loop's:

- input:  the data loader (`parts.SourceInput`), the previous stage in the same process (`parts.Handoff`) or
          over the transport (`pipeline.links.Gather`);
- output: the next stage in the same process (`parts.Handoff`), the transport (`pipeline.links.Fanout`), or
          nowhere (`parts.Nowhere`, the last stage);
- commit: locally, once every stage of the process has saved (`parts.LocalCommit`), or gathered across the
          worker group with rank 0 committing (`parts.GatheredCommit`).

The reference runner chains every stage's loop in one process; a pipeline worker runs one. `LoopPolicy` says
when to log and when to checkpoint, for both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from vgim_dist.config import Config
from vgim_dist.progress import eta
from vgim_dist.tracking import StageLogger
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.stage import Stage, metric_names

STAGE_STATS = ("wait_input_frac", "wait_consumer_frac", "step_time_s", "in_flight")


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a resumable checkpoint."""

    @classmethod
    def at(cls, step: int) -> Interrupted:
        return cls(f"stopped at step {step}; checkpoint saved, continue with --resume")


def check_finished(step: int, total: int) -> None:
    """Raise `Interrupted` when a run ended at ``step`` before its ``total`` steps (a Ctrl-C)."""
    if step < total:
        raise Interrupted.at(step)


@dataclass(frozen=True)
class Pace:
    """Wall time over the steps since the last logged step."""

    elapsed_s: float
    steps: int
    batch: int      # windows per step (the whole batch, on every replica)

    @property
    def step_time_s(self) -> float:
        return self.elapsed_s / self.steps

    def metrics(self) -> dict[str, float]:
        """``windows_per_s`` and ``step_time_s``: what a metrics row records of the run's pace."""
        return {"windows_per_s": self.steps * self.batch / self.elapsed_s, "step_time_s": self.step_time_s}


class LoopPolicy:
    """Call ``tick()`` after each step; ``pace()`` on the steps where ``should_log(step)``; ``checkpoint(step)``
    after each step, and ``checkpoint(step, last_step=True)`` once the loop ends. It decides when ``save`` runs:
    every ``checkpoint.every`` steps, and at the end unless that step is already saved (a run that took no
    step at all still saves step 0, so that every run leaves a checkpoint). A started ``monitor`` (the
    background evaluator, eval.every) hears of every saved checkpoint and is closed after the last."""

    def __init__(self, cfg: Config, start: int, save: Callable[[int], None], monitor=None):
        self.total, self.log_every = cfg.run.steps, cfg.run.log_every
        self.every, self.batch = cfg.checkpoint.every, cfg.data.batch_size
        self.save, self.last_saved = save, start
        self.monitor = monitor
        self._t0, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        self._steps += 1

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def pace(self) -> Pace:
        """The pace since the previous call (or the start); begins the next window."""
        now = time.perf_counter()
        pace = Pace(now - self._t0, self._steps, self.batch)
        self._t0, self._steps = now, 0
        return pace

    def checkpoint(self, step: int, last_step: bool = False) -> None:
        due = (step != self.last_saved or step == 0) if last_step else bool(self.every) and step % self.every == 0
        if due:
            self.save(step)
            self.last_saved = step
            if self.monitor:
                self.monitor.committed(step)
        if last_step and self.monitor:
            self.monitor.close()


@dataclass(frozen=True)
class MetricsLayout:
    """The metrics vector a stage forwards with its output: stage by stage, each stage's loss terms (its
    `Stage.metric_names`) then, where the arrangement measures them, its `STAGE_STATS`. Stage s receives the
    part of stages 0..s-1 (``carried_width(s)`` values) and appends its own."""

    stages: tuple[tuple[str, ...], ...]     # the names each stage appends, in order
    stats: bool                             # whether each stage appends its STAGE_STATS

    @classmethod
    def of(cls, cfg: Config, stats: bool) -> MetricsLayout:
        return cls(tuple(tuple(metric_names(cfg.model, modules) + ([f"stage.{s}.{k}" for k in STAGE_STATS]
                                                                   if stats else []))
                         for s, modules in enumerate(cfg.stage_modules())), stats)

    def own(self, stage: int) -> list[str]:
        """The names stage ``stage`` appends."""
        return list(self.stages[stage])

    def carried_width(self, stage: int) -> int:
        """How many values stage ``stage`` receives from the stages before it."""
        return sum(len(names) for names in self.stages[:stage])

    @property
    def names(self) -> list[str]:
        """The whole vector, as the last stage holds it."""
        return [n for names in self.stages for n in names]


# ------------------------------------------------------------------------------------------- plugged parts


class Input(Protocol):
    """Where a stage's input comes from: (batch, metrics carried from the stages before) per step."""

    wait_s: float       # time spent waiting for input so far

    def items(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The inputs of steps ``start + 1``, ``start + 2``, ... until the run ends or is stopped."""


class Output(Protocol):
    """Where a stage's output goes."""

    wait_s: float       # time spent waiting for the consumer so far
    depth_sum: int      # in-flight depth, summed over sends

    def send(self, x: torch.Tensor, carried: torch.Tensor) -> None: ...

    def close(self) -> None:
        """The stream is over: the consumer leaves its loop, and so reaches the final checkpoint."""


class Commit(Protocol):
    """How a checkpoint that every stage has saved is committed."""

    def agree(self, start: int) -> int:
        """The step every stage starts from, given this process's ``start``."""

    def commit(self, step: int, written: dict[str, dict]) -> None:
        """This process's stage has written ``written`` (`CheckpointManager.save_stage`) for ``step``."""


class Waits:
    """Where a stage's time went since the last logged step: waiting for input, for its consumer."""

    def __init__(self, inputs: Input, output: Output):
        self.inputs, self.output = inputs, output
        self.start = self._counters()

    def _counters(self) -> tuple[float, float, int]:
        return self.inputs.wait_s, self.output.wait_s, self.output.depth_sum

    def take(self, pace: Pace) -> list[float]:
        """The values of STAGE_STATS over ``pace``'s window; starts the next one."""
        now = self._counters()
        wait_in, wait_out, depth = (n - then for n, then in zip(now, self.start))
        self.start = now
        return [wait_in / pace.elapsed_s, wait_out / pace.elapsed_s, pace.step_time_s, depth / pace.steps]


# ------------------------------------------------------------------------------------------- the loop


class StageLoop:
    """Trains ``stage`` from a checkpoint to the end of its input: restore, step, forward, log, checkpoint."""

    cfg: Config
    stage: Stage
    inputs: Input
    output: Output
    commit: Commit
    checkpoints: CheckpointManager
    layout: MetricsLayout
    metrics: MetricsLog | None      # the rows of the run: kept by the one loop that sees every stage's numbers
    tracking: StageLogger | None    # this stage's own numbers (its MLflow child run); its owner closes it
    console: bool                   # the stage speaks for itself on the console (one process per stage)
    start: int                      # the step restored
    step: int                       # the step reached

    def __init__(self, cfg: Config, stage: Stage, *, inputs: Input, output: Output, commit: Commit,
                 checkpoints: CheckpointManager, layout: MetricsLayout, metrics: MetricsLog | None = None,
                 tracking: StageLogger | None = None, console: bool = False,
                 monitor: Callable[[MetricsLog], object] | None = None):
        self.cfg, self.stage = cfg, stage
        self.inputs, self.output, self.commit = inputs, output, commit
        self.checkpoints, self.layout = checkpoints, layout
        self.metrics, self.tracking, self.console = metrics, tracking, console
        self.monitor = monitor      # starts the background evaluator (eval.every) on the rows, if this loop has them
        self.start = self.step = 0

    def restore(self, start: int) -> int:
        """Load the checkpoint of the step every stage agrees on, given this process's ``start`` (0: a fresh
        run, nothing to load); `run` trains from there. The step restored."""
        self.start = self.step = start = self.commit.agree(start)
        if start:
            self.checkpoints.load_stage(self.stage, start)
        if self.metrics:
            self.metrics.resume(start)
        return start

    def save(self, step: int) -> None:
        written = self.checkpoints.save_stage(self.stage, step)
        if self.metrics:
            self.metrics.flush()
        self.commit.commit(step, written)

    def run(self) -> int:
        """Train from the restored step to the end of the input; the step reached."""
        for _ in self.steps():
            pass
        return self.step

    def _first_step_line(self, step: int, seconds: float) -> None:
        """At once after the first step, so that a run with a long ``run.log_every`` is not silent until then."""
        every = self.cfg.run.log_every
        where = f"stage {self.stage.index} " if self.console and (self.stage.index or not self.metrics) else ""
        print(f"{where}step {step}/{self.cfg.run.steps} took {seconds:.1f} s (the first includes warm-up); "
              f"a line every {every} steps from here", file=sys.stderr, flush=True)

    def steps(self) -> Iterator[int]:
        """`run`, one step per iteration: yields each step once its output is handed on and saved if due."""
        start = self.start
        monitor = self.monitor(self.metrics) if self.monitor and self.metrics else None
        policy = LoopPolicy(self.cfg, start, self.save, monitor)
        stage, layout = self.stage, self.layout
        waits = Waits(self.inputs, self.output) if layout.stats else None
        device = stage.device
        unlogged = torch.zeros(len(STAGE_STATS) if waits else 0, dtype=torch.float64, device=device)
        clock = (time.monotonic(), start)     # elapsed and ETA of this stage's progress line
        for x, carried in self.inputs.items(start):
            x, losses = stage.train_step(x)
            self.step = step = stage.step
            policy.tick()
            pace = policy.pace() if policy.should_log(step) else None
            # A host-to-device copy waits for the GPU: only on logged steps.
            stats = (torch.tensor(waits.take(pace), dtype=torch.float64, device=device) if pace and waits
                     else unlogged)
            mine = torch.cat([torch.stack([losses[n] for n in stage.metric_names]).double(), stats])
            vector = torch.cat([carried, mine])
            self.output.send(x, vector)
            if pace and self.metrics:       # the loop that sees every stage's numbers writes the row
                self.metrics.record(step, {**dict(zip(layout.names, vector.tolist())), **pace.metrics()},
                                    prefix=f"stage {stage.index} " if self.console and stage.index else "")
            elif pace and self.console:
                # Each stage's own pace (it may run up to pipeline.in_flight steps ahead of the next).
                print(f"stage {stage.index} step {step}/{self.cfg.run.steps} | "
                      f"{eta(time.monotonic(), step, clock, self.cfg.run.steps)}", file=sys.stderr, flush=True)
            elif step == start + 1 and (self.metrics or self.console):
                self._first_step_line(step, time.monotonic() - clock[0])
            if pace and self.tracking is not None:      # the stage's own numbers and pace
                self.tracking.log(step, {**dict(zip(layout.own(stage.index), mine.tolist())), **pace.metrics()})
            policy.checkpoint(step)
            yield step
        self.output.close()
        policy.checkpoint(self.step, last_step=True)
