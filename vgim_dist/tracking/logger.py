"""Worker side of tracking: a stage's metrics, buffered and sent to its MLflow child run in batches.

`StageLogger` runs wherever a stage trains (the driver for the reference runner, a Ray worker for the
pipeline). It never raises into training: a store that is down or locked costs a few retries per flush,
the rows stay buffered, and the next flush sends them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # mlflow takes a second or two to import: only when tracking is on
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

LAST_STEP_TAG = "vgim.last_step"  # the newest step a run holds; written with the metrics, read on restart
_MAX_METRICS = 999                # MLflow's log_batch limit is 1000 entities; one slot for the tag


@dataclass(frozen=True)
class StageRef:
    """What a worker needs to log into its stage's run; small and picklable."""

    tracking_uri: str
    run_id: str
    stage: int
    flush_every: int
    retries: int
    system_metrics: bool  # sample this process's CPU/GPU into the run


def client(uri: str) -> MlflowClient:
    """An MlflowClient whose HTTP requests fail fast: our own retries wrap whole batches, and MLflow's
    default (7 retries, exponential backoff, 120 s timeout) would stall a training step for minutes."""
    from mlflow import MlflowClient  # noqa: PLC0415

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(uri)


def retry(fn: Callable[[], T], attempts: int, what: str) -> T:
    """``fn()``, tried ``attempts`` times with 0.5, 1, 2, ... s between tries; the last error propagates."""
    for k in range(attempts - 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - connection refused, locked SQLite, 5xx: all transient here
            log.debug("%s failed (%s), retrying", what, e)
            time.sleep(0.5 * 2 ** k)
    return fn()


def start_system_metrics(uri: str, run_id: str) -> Any:
    """A started MLflow system-metrics sampler for this process, or None where psutil is missing."""
    if importlib.util.find_spec("psutil") is None:
        log.warning("tracking.system_metrics: psutil is not installed, no system/* metrics")
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: PLC0415

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def stage_metrics(row: Mapping[str, float], module_ids: list[int]) -> dict[str, float]:
    """The part of a whole-job metrics row that belongs to one stage: its modules' ``module.<i>.*`` keys
    and every key that names no module (step time, throughput)."""
    own = tuple(f"module.{i}." for i in module_ids)
    return {k: v for k, v in row.items() if k != "step" and (k.startswith(own) or not k.startswith("module."))}


@dataclass
class _Row:
    step: int
    timestamp_ms: int
    values: dict[str, float]


class StageLogger:
    """``log(step, values)`` buffers a row; every ``flush_every`` rows, and at ``close()``, the buffer goes to
    the stage's run in `MlflowClient.log_batch` requests. With ``ref=None`` (tracking off) it does nothing.

    Steps at or below the run's ``vgim.last_step`` tag are dropped, so a stage restarted from an older
    checkpoint than it had logged (a Ray Train group restart, a ``--resume``) never logs a step twice.
    """

    def __init__(self, ref: StageRef | None):
        self.ref = ref
        self.pending: list[_Row] = []
        self._last_step: int | None = None  # read from the run on the first flush
        self._failing = False
        self._client = client(ref.tracking_uri) if ref else None
        self._monitor = start_system_metrics(ref.tracking_uri, ref.run_id) if ref and ref.system_metrics else None

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Buffer one row; ``values`` are floats or 0-dim tensors (converted here, so log only every few steps)."""
        if self.ref is None:
            return
        self.pending.append(_Row(step, int(time.time() * 1000), {k: float(v) for k, v in values.items()}))
        if len(self.pending) >= self.ref.flush_every:
            self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the stage's run (where it trains: node, device); a store that is down costs a warning only."""
        if self.ref is None:
            return
        from mlflow.entities import RunTag  # noqa: PLC0415

        try:
            retry(lambda: self._client.log_batch(self.ref.run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
                  self.ref.retries, "set_tags")
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("tracking: stage %d could not tag its run on %s (%s)", self.ref.stage,
                        self.ref.tracking_uri, e)

    def flush(self) -> bool:
        """Send what is buffered; True when nothing is left. Failures keep the rows and warn once per outage."""
        if self.ref is None or not self.pending:
            return True
        try:
            if self._last_step is None:
                self._last_step = self._read_last_step()
            self.pending = [r for r in self.pending if r.step > self._last_step]
            while self.pending:
                n = max(1, _MAX_METRICS // max(len(r.values) for r in self.pending))
                self._send(self.pending[:n])
                self._last_step = self.pending[:n][-1].step
                del self.pending[:n]
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            if not self._failing:
                log.warning("tracking: stage %d could not reach %s (%s); keeping %d metric rows buffered",
                            self.ref.stage, self.ref.tracking_uri, e, len(self.pending))
            self._failing = True
            return False
        if self._failing:
            log.info("tracking: stage %d reached %s again", self.ref.stage, self.ref.tracking_uri)
            self._failing = False
        return True

    def close(self) -> None:
        """Flush, stop the system-metrics sampler; rows that still cannot be sent are reported, not raised."""
        if self.ref is None:
            return
        if not self.flush():
            log.warning("tracking: stage %d lost %d metric rows (steps %d..%d); they are in metrics.jsonl",
                        self.ref.stage, len(self.pending), self.pending[0].step, self.pending[-1].step)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def __enter__(self) -> StageLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_last_step(self) -> int:
        run = retry(lambda: self._client.get_run(self.ref.run_id), self.ref.retries, "get_run")
        return int(run.data.tags.get(LAST_STEP_TAG, -1))

    def _send(self, rows: list[_Row]) -> None:
        from mlflow.entities import Metric, RunTag  # noqa: PLC0415

        metrics = [Metric(k, v, r.timestamp_ms, r.step) for r in rows for k, v in r.values.items()]
        # The tag travels in the same request, so the run's metrics and its last step agree.
        tags = [RunTag(LAST_STEP_TAG, str(rows[-1].step))]
        retry(lambda: self._client.log_batch(self.ref.run_id, metrics=metrics, tags=tags),
              self.ref.retries, "log_batch")
