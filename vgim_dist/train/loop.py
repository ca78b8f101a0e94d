"""The run loop's policy, shared by both runners: when to log, when to checkpoint (the final save included),
and the pace. The runners differ only in where a step's batch comes from and where its output goes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from vgim_dist.config import Config


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a resumable checkpoint."""


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
    step at all still saves step 0, so that every run leaves a checkpoint)."""

    def __init__(self, cfg: Config, start: int, save: Callable[[int], None]):
        self.total, self.log_every = cfg.run.steps, cfg.run.log_every
        self.every, self.batch = cfg.checkpoint.every, cfg.data.batch_size
        self.save, self.last_saved = save, start
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
