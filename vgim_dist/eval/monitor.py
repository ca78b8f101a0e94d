"""Probe curves while training: a background evaluator probes every ``eval.every``-th committed checkpoint.

The evaluator runs outside the training threads, at idle priority: a subprocess (``eval.cpus`` torch threads)
next to the reference runner, a Ray actor with its own CPU share (``eval.cpus``) on a pipeline run. The trainer only
hands it step numbers and collects finished results, never waiting. At most one checkpoint is being probed
and one waits; a newer commit replaces the waiting one, and the skipped step is logged, so the evaluator
never queues without bound. Step 0 (the encoder as initialised) is always the first point.

Results come back as ``probe.<task>.module.<i>`` values (accuracy of a time-averaged, z-scored linear probe),
which the trainer writes into ``metrics.jsonl`` and the parent MLflow run against the checkpoint's step.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from vgim_dist.config import Config, load_config
from vgim_dist.tracking.logger import StageLogger, StageRef

log = logging.getLogger(__name__)

Result = tuple[int, dict[str, float]]  # (checkpoint step, {"probe.<task>.module.<i>": accuracy})
NICE = 19  # where the idle class is missing (not Linux): the lowest priority niceness gives
CHECKPOINT_WAIT_S = 120  # a pipeline's commit can trail the last stage's save by a barrier and a write


def probe_checkpoint(cfg: Config, step: int) -> dict[str, float]:
    """Probe every module of ``cfg``'s run at checkpoint ``step`` on each of ``eval.tasks``; waits for the
    checkpoint to be complete (step 0 needs none)."""
    from vgim_dist.eval.probes import ProbeSettings, probe_run  # noqa: PLC0415 - torch only in the evaluator

    settings = ProbeSettings(epochs=cfg.eval.epochs, standardize=True)
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    values = {}
    for task in cfg.eval.tasks:
        while True:
            try:
                r = probe_run(cfg.run.dir, task, cfg.eval.data, settings=settings, step=step, track=False,
                              baseline=False, save=False)
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        values.update({f"probe.{task}.module.{m}": e["accuracy"]["mean"] for m, e in r["modules"].items()})
    return values


class ProbeMonitor:
    """The trainer's side (the run loop's `LoopPolicy` calls it): ``committed(step)`` after each checkpoint
    commit (returns at once), ``close()`` at the end of training. Picklable until started, so a pipeline's
    driver can create it and hand it to the worker that owns the metrics."""

    def __init__(self, cfg: Config, parent: StageRef | None = None):
        self.cfg = cfg
        self.parent = parent  # the job's parent MLflow run, when tracked
        self.metrics = None   # the run's `MetricsLog`, given at start
        self.commits = 0
        self.busy: int | None = None     # step being probed
        self.waiting: int | None = None  # the next step to probe
        self.skipped: list[int] = []
        self._backend: _Subprocess | _Actor | None = None
        self._logger: StageLogger | None = None

    def start(self, backend: str, metrics) -> ProbeMonitor:
        """``backend``: ``subprocess`` (reference runner) or ``ray`` (an actor; call inside a Ray job);
        ``metrics``: the `MetricsLog` that the results go into (and the parent MLflow run, if tracked)."""
        self.metrics = metrics
        self._backend = _Subprocess(self.cfg) if backend == "subprocess" else _Actor(self.cfg)
        self._logger = StageLogger(self.parent)
        self._submit(0)
        return self

    def committed(self, step: int) -> None:
        """A checkpoint was saved: probe it if it is an ``eval.every``-th one; collect finished results."""
        self.commits += 1
        if self.commits % self.cfg.eval.every == 0:
            self._submit(step)
        self.results()

    def _submit(self, step: int) -> None:
        if self.busy is None:
            self.busy = step
            self._backend.send(step)
            return
        if self.waiting is not None:
            self.skipped.append(self.waiting)
            log.warning("evaluator: behind training, skipping the probe of step %d (probing %d, next %d)",
                        self.waiting, self.busy, step)
        self.waiting = step

    def results(self) -> list[Result]:
        """Finished probes since the last call, oldest first, added to the metrics rows and logged to the
        parent MLflow run; sends the waiting step when the evaluator frees."""
        out = []
        for step, values in self._backend.poll():
            out.append((step, values))
            if values:
                self.metrics.add(step, values)
            log.info("evaluator: step %d %s", step, " ".join(f"{k[6:]} {v:.3f}" for k, v in values.items()))
            if values:
                self._logger.log(step, values)  # sent by the logger's own thread
            self.busy = None
            if self.waiting is not None:
                step, self.waiting = self.waiting, None
                self._submit(step)
        return out

    def close(self, timeout: float = 600) -> list[Result]:
        """After training: wait (at most ``timeout`` s) for the probes in flight and waiting, then stop."""
        out, deadline = [], time.monotonic() + timeout
        while self.busy is not None and time.monotonic() < deadline and self._backend.alive():
            out += self.results()
            time.sleep(0.2)
        out += self.results()
        if self.busy is not None:
            log.warning("evaluator: gave up waiting for the probe of step %d", self.busy)
        if self.skipped:
            log.warning("evaluator: skipped %d checkpoints while behind: steps %s", len(self.skipped), self.skipped)
        self._backend.stop()
        self._logger.close()
        self.metrics.flush()
        return out


# --------------------------------------------------------------------------------------------- backends


class _Subprocess:
    """``python -m vgim_dist.eval.monitor RUN_DIR`` (its config.yaml): steps in on stdin, one JSON result per
    line out."""

    def __init__(self, cfg: Config):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(cfg.eval.cpus)))}
        self.proc = subprocess.Popen([sys.executable, "-m", "vgim_dist.eval.monitor", cfg.run.dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="evaluator-reader").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def send(self, step: int) -> None:
        self.proc.stdin.write(f"{step}\n")
        self.proc.stdin.flush()

    def poll(self) -> list[Result]:
        out = []
        while not self.lines.empty():
            r = json.loads(self.lines.get())
            if "error" in r:
                log.warning("evaluator: step %d failed: %s", r["step"], r["error"])
            out.append((r["step"], r.get("values", {})))
        return out

    def alive(self) -> bool:
        if self.proc.poll() is None or not self.lines.empty():
            return True
        log.warning("evaluator: its process ended (exit code %s)", self.proc.returncode)
        return False

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Actor:
    """A Ray actor with ``eval.cpus`` CPUs; ``send`` returns at once, ``poll`` looks at finished calls."""

    def __init__(self, cfg: Config):
        import ray  # noqa: PLC0415

        self.ray = ray
        free = ray.available_resources().get("CPU", 0.0)
        if free < cfg.eval.cpus:
            log.warning("evaluator: the Ray cluster has %.1f free CPUs and eval.cpus is %g: its probes wait for a "
                        "CPU (eval.cpus=0 lets it share the stages' CPUs)", free, cfg.eval.cpus)
        self.actor = ray.remote(num_cpus=cfg.eval.cpus)(_Evaluator).remote(cfg)
        self.calls: list = []

    def send(self, step: int) -> None:
        self.calls.append(self.actor.probe.remote(step))

    def poll(self) -> list[Result]:
        if not self.calls:
            return []
        done, self.calls = self.ray.wait(self.calls, num_returns=len(self.calls), timeout=0)
        out = []
        for ref in done:
            r = self.ray.get(ref)
            if "error" in r:
                log.warning("evaluator: step %d failed: %s", r["step"], r["error"])
            out.append((r["step"], r.get("values", {})))
        return out

    def alive(self) -> bool:
        return True  # a dead actor fails its calls, which poll() reports

    def stop(self) -> None:
        self.ray.kill(self.actor)


class _Evaluator:
    """The process that probes: the subprocess's main loop, or the Ray actor."""

    def __init__(self, cfg: Config):
        import torch  # noqa: PLC0415

        self.cfg = cfg
        lowest_priority()
        torch.set_num_threads(max(1, int(self.cfg.eval.cpus)))

    def probe(self, step: int) -> dict:
        try:
            return {"step": step, "values": probe_checkpoint(self.cfg, step)}
        except Exception as e:  # noqa: BLE001 - one failed probe must not end the curve or the training
            return {"step": step, "error": f"{type(e).__name__}: {e}"}


def lowest_priority() -> None:
    """Training first: this process runs only on CPU time the trainer leaves. Linux's idle scheduling class
    does that; a niceness alone still takes a share, and a trainer whose threads meet at every operator's
    barrier loses more than that share (5: 2.2x the step time on 2 cores)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(NICE)


def main() -> None:
    lowest_priority()  # first: its imports and config load take CPU too
    cfg = load_config(Path(sys.argv[1]) / "config.yaml")
    cfg.run.dir = sys.argv[1]  # the directory as given, not as written when training started
    evaluator = _Evaluator(cfg)
    for line in sys.stdin:
        print(json.dumps(evaluator.probe(int(line))), flush=True)


if __name__ == "__main__":
    main()
