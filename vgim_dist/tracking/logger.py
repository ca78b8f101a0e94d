"""Worker side of tracking: a stage's metrics, sent to its MLflow child run by a background thread.

`StageLogger` runs wherever a stage trains (the driver for the reference runner, a Ray worker for the
pipeline). The training thread only puts rows into a bounded queue; a sender thread batches them into
``log_batch`` requests, and samples the process's CPU, memory and GPU. A store that is down, locked or hung
(accepts connections and never answers) never slows a step: rows wait in the queue, the oldest are dropped
when it is full, and the counters say how many were sent late or dropped (``metrics.jsonl`` has them all).
At the end of a run a stage keeps trying for ``CLOSE_GRACE_S``: a store that answers again within it gets
every row. A row counts as sent only once the store has acknowledged a request that holds it.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from vgim_dist.config import redact

if TYPE_CHECKING:  # mlflow takes a second or two to import: only when tracking is on, and off the training thread
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

LAST_STEP_TAG = "vgim.last_step"  # the newest step a run holds; written with the metrics, read on restart
HTTP_TIMEOUT_S = 10               # per request to a tracking server (MLflow's default is 120 s)
FLUSH_S = 5.0                     # a row waits at most this long for its batch: the UI stays live
CLOSE_GRACE_S = 60.0              # at the end of a run, how long a stage keeps trying for its unsent rows
CLOSE_RETRY_S = 1.0               # pause between those tries
SYSTEM_EVERY_S = 10.0             # process CPU, memory and GPU samples
MAX_BATCH = 1000                  # MLflow's log_batch limit: entities per request
_MAX_METRICS = MAX_BATCH - 1      # one slot for the tag
_NO_ANSWER = re.compile(r"API request to \S+ failed with (timeout )?exception")


@dataclass(frozen=True)
class StageRef:
    """What a worker needs to log into its stage's run; small and picklable."""

    tracking_uri: str
    run_id: str
    stage: int            # -1: the job's parent run (system metrics of the reference runner's process)
    flush_every: int
    retries: int
    system_metrics: bool  # sample this process's CPU/GPU into the run
    max_pending: int = 10_000

    @property
    def name(self) -> str:
        return "job" if self.stage < 0 else f"stage {self.stage}"


def client(uri: str) -> MlflowClient:
    """An MlflowClient whose HTTP requests fail fast: our own retries wrap whole batches, and MLflow's
    default (7 retries, exponential backoff, 120 s timeout) would hold a batch for minutes."""
    from mlflow import MlflowClient  # noqa: PLC0415

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    # Two INFO lines each time a process opens a new SQLite store ("Creating initial MLflow database tables").
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(uri)


def retry(fn: Callable[[], T], attempts: int, what: str, deadline: Callable[[], float] = lambda: math.inf) -> T:
    """``fn()``, tried ``attempts`` times with 0.5, 1, 2, ... s between tries, none started after
    ``deadline()`` (``time.monotonic()``); the last error propagates."""
    for k in range(attempts - 1):
        try:
            return fn()
        except Exception as e:  # connection refused, locked SQLite, 5xx: transient here
            if _refused_for_good(e) or time.monotonic() + 0.5 * 2 ** k >= deadline():
                raise
            log.debug("%s failed (%s), retrying", what, e)
            time.sleep(0.5 * 2 ** k)
    return fn()


def request_timeout_s() -> float:
    """How long one request to a tracking server may wait for its answer (see `client`)."""
    try:
        return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S))
    except ValueError:
        return float(HTTP_TIMEOUT_S)


def stage_metrics(row: Mapping[str, float], module_ids: list[int]) -> dict[str, float]:
    """The part of a whole-job metrics row that belongs to one stage: its modules' ``module.<i>.*`` keys
    and every key that names no module (step time, throughput)."""
    own = tuple(f"module.{i}." for i in module_ids)
    return {k: v for k, v in row.items() if k != "step" and (k.startswith(own) or not k.startswith("module."))}


class ProcessSampler:
    """This process's CPU share, resident memory and, where it trains on a GPU, that GPU's utilisation and
    memory: the ``system/*`` metrics of the run it logs to."""

    def __init__(self):
        import psutil  # noqa: PLC0415

        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # the first call starts the measuring interval

    def sample(self) -> dict[str, float]:
        values = {"system/process_cpu_percent": self.proc.cpu_percent(None),
                  "system/process_rss_mb": self.proc.memory_info().rss / 2**20}
        import torch  # noqa: PLC0415 - imported already by whoever trains

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            values["system/gpu_memory_reserved_mb"] = torch.cuda.memory_reserved(device) / 2**20
            try:
                values["system/gpu_utilization_percent"] = float(torch.cuda.utilization(device))
            except Exception:  # noqa: BLE001 - needs pynvml (or amdsmi); memory alone then
                pass
        return values


@dataclass
class _Row:
    step: int
    timestamp_ms: int
    values: dict[str, float]
    system: bool = False  # a system sample: not subject to the last-step rule, does not move the tag
    failed: int = field(default=0, compare=False)  # send attempts that failed
    # A failed attempt went out and got no answer (a timeout, a reset): the store may apply it yet, so the
    # row may be in MLflow although no request holding it was acknowledged.
    unanswered: bool = field(default=False, compare=False)


@dataclass
class _Tags:
    tags: dict[str, str]


_STOP = object()


class StageLogger:
    """``log(step, values)`` queues a row and returns at once; a sender thread sends rows every
    ``flush_every`` rows or every few seconds, and at ``close()``. With ``ref=None`` (tracking off) it does
    nothing.

    Steps at or below the run's ``vgim.last_step`` tag are dropped, so a stage restarted from an older
    checkpoint than it had logged (a Ray Train group restart, a ``--resume``) never logs a step twice.
    ``counters`` say what the store cost: ``sent`` (acknowledged by the store: MLflow holds them), ``delayed``
    (of those, sent after a failed attempt), ``dropped`` (never reached the store) and ``unanswered`` (sent,
    never acknowledged: the store may still apply them, so MLflow may or may not hold them).
    """

    def __init__(self, ref: StageRef | None):
        self.ref = ref
        self.counters = {"sent": 0, "delayed": 0, "dropped": 0, "unanswered": 0}
        self.pending: list[_Row] = []     # the sender's rows not yet acknowledged by the store
        self._queue: queue.Queue = queue.Queue(maxsize=ref.max_pending if ref else 1)
        self._lock = threading.Lock()     # counters are written by both threads
        self._last_step: int | None = None
        self._latest = 0                  # newest step seen: system samples are logged at it
        self._failing_since: float | None = None
        self._deadline = math.inf         # set by close(): no request starts after it
        self._closed = False              # close() has counted what is left: the sender counts nothing more
        self._warned_drop = False
        self._thread: threading.Thread | None = None
        if ref is not None:
            self._thread = threading.Thread(target=self._run, name=f"tracking-{ref.name}", daemon=True)
            self._thread.start()

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Queue one row; ``values`` are floats or 0-dim tensors (converted here, so log only every few steps).
        Never blocks: when the queue is full the row is dropped and counted."""
        if self.ref is None:
            return
        self._put(_Row(step, int(time.time() * 1000), {k: float(v) for k, v in values.items()}))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the stage's run (where it trains: node, device), from the sender thread like every request; a
        store that is down costs a warning only."""
        if self.ref is not None:
            self._put(_Tags(dict(tags)))

    def _put(self, row: _Row | _Tags) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._dropped(1, "queue full")

    def close(self) -> None:
        """Send what is queued and stop the sender. A store that does not take the rows is tried again for
        ``CLOSE_GRACE_S`` (plus the request in flight then); rows it has not acknowledged by then are
        reported with their counts, never raised."""
        if self.ref is None or self._thread is None:
            return
        self._deadline = time.monotonic() + CLOSE_GRACE_S
        try:
            self._queue.put(_STOP, timeout=1)
        except queue.Full:  # a full queue behind a hung store: the sender sees the flag instead
            pass
        self._stop = True
        self._thread.join(timeout=CLOSE_GRACE_S + request_timeout_s() + 5)
        self._thread = None
        with self._lock:  # a sender still stuck in a request past the join counts nothing more
            self._closed = True
            unsent = [r for r in self.pending + [r for r in _drain(self._queue) if isinstance(r, _Row)]
                      if not r.system]
            for r in unsent:
                self.counters["unanswered" if r.unanswered else "dropped"] += 1
        c = self.counters
        if c["delayed"] or c["dropped"] or c["unanswered"]:
            unsure = (f"; {c['unanswered']} more were sent but not acknowledged within the {CLOSE_GRACE_S:.0f} s "
                      "grace: MLflow holds them only if the store still applies those requests"
                      if c["unanswered"] else "")
            log.warning("tracking: %s sent %d metric rows to %s, %d of them late, and dropped %d%s; "
                        "metrics.jsonl has every row", self.ref.name, c["sent"], redact(self.ref.tracking_uri),
                        c["delayed"], c["dropped"], unsure)

    def __enter__(self) -> StageLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- sender thread

    _stop = False

    def _run(self) -> None:
        ref = self.ref
        try:
            self._client = client(ref.tracking_uri)
            sampler = ProcessSampler() if ref.system_metrics else None
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("tracking: %s cannot log to %s (%s)", ref.name, redact(ref.tracking_uri), e)
            self._stop = True
            return
        last_flush = next_sample = time.monotonic()
        stopping = False
        while not stopping:
            now = time.monotonic()
            wait = max(0.0, min(last_flush + FLUSH_S, next_sample if sampler else now + FLUSH_S) - now)
            for item in _drain(self._queue, timeout=wait):
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Tags):
                    self._send_tags(item.tags)
                else:
                    self.pending.append(item)
                    self._latest = max(self._latest, item.step)
            stopping = stopping or self._stop
            now = time.monotonic()
            if sampler and (now >= next_sample or stopping):
                self.pending.append(_Row(self._latest, int(time.time() * 1000), sampler.sample(), system=True))
                next_sample = now + SYSTEM_EVERY_S
            overflow = len(self.pending) - ref.max_pending
            if overflow > 0:  # the store is away for long: keep the newest rows
                self._give_up(self.pending[:overflow], "queue full")
                del self.pending[:overflow]
            due = len(self.pending) >= ref.flush_every or now - last_flush >= FLUSH_S
            if due and not stopping:  # the clock restarts even with nothing to send: else the wait above is 0
                if self.pending:      # and this loop spins
                    self._flush(ref.retries)
                last_flush = time.monotonic()
        # The end of the run: one request at a time until the store takes every metric row or the grace is
        # over. A request that timed out may still be applied by a store that wakes, so every row goes again
        # (MLflow keeps one copy of a metric logged twice with the same step, time and value) until one
        # request that holds it is acknowledged.
        waiting = False
        while self.pending and not self._flush(1) and any(not r.system for r in self.pending):
            left = self._deadline - time.monotonic()
            if left <= 0:
                return
            if not waiting:
                waiting = True
                log.warning("tracking: %s keeps trying to send its last %d metric rows to %s, for up to %.0f s "
                            "after training", ref.name, sum(not r.system for r in self.pending),
                            redact(ref.tracking_uri), CLOSE_GRACE_S)
            time.sleep(min(CLOSE_RETRY_S, left))

    def _flush(self, attempts: int) -> bool:
        """Send ``pending``, each request tried ``attempts`` times; True when nothing is left. A failure keeps
        the rows and warns once per outage."""
        ref = self.ref
        try:
            if self._last_step is None:
                self._last_step = self._read_last_step(attempts)
            self.pending = [r for r in self.pending if r.system or r.step > self._last_step]
            while self.pending:
                n = max(1, _MAX_METRICS // max(len(r.values) for r in self.pending))
                batch = self.pending[:n]
                self._send(batch, attempts)
                with self._lock:
                    if not self._closed:
                        self.counters["sent"] += sum(not r.system for r in batch)
                        self.counters["delayed"] += sum(bool(r.failed) and not r.system for r in batch)
                del self.pending[:n]
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            for r in self.pending:
                r.failed += 1
            if _refused_for_good(e):
                self._give_up(self.pending, f"{redact(ref.tracking_uri)} refuses them ({_one_line(e)})")
                self.pending = []
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("tracking: %s cannot reach %s (%s); metric rows wait in a queue of %d, training "
                            "goes on", ref.name, redact(ref.tracking_uri), _one_line(e), ref.max_pending)
            return False
        if self._failing_since is not None:
            log.info("tracking: %s reached %s again after %.0f s", ref.name, redact(ref.tracking_uri),
                     time.monotonic() - self._failing_since)
            self._failing_since = None
        return True

    def _send_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag  # noqa: PLC0415

        try:
            retry(lambda: self._client.log_batch(self.ref.run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
                  self.ref.retries, "set_tags", lambda: self._deadline)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("tracking: %s could not tag its run on %s (%s)", self.ref.name, redact(self.ref.tracking_uri),
                        _one_line(e))

    def _dropped(self, n: int, why: str) -> None:
        with self._lock:
            self.counters["dropped"] += n
        self._warn_drop(why)

    def _give_up(self, rows: list[_Row], why: str) -> None:
        """Stop trying to send ``rows``: counted dropped, or unanswered where a request holding one went out
        without an answer (the store may apply it yet)."""
        rows = [r for r in rows if not r.system]
        with self._lock:
            for r in rows:
                self.counters["unanswered" if r.unanswered else "dropped"] += 1
        if rows:
            self._warn_drop(why)

    def _warn_drop(self, why: str) -> None:
        if self._warned_drop:
            return
        self._warned_drop = True
        if why == "queue full":
            log.warning("tracking: %s is dropping metric rows: %s is not keeping up (queue of %d full); "
                        "metrics.jsonl has every row", self.ref.name, redact(self.ref.tracking_uri),
                        self.ref.max_pending)
        else:
            log.warning("tracking: %s is dropping metric rows: %s; metrics.jsonl has every row", self.ref.name, why)

    def _read_last_step(self, attempts: int) -> int:
        run = retry(lambda: self._client.get_run(self.ref.run_id), attempts, "get_run", lambda: self._deadline)
        return int(run.data.tags.get(LAST_STEP_TAG, -1))

    def _send(self, rows: list[_Row], attempts: int) -> None:
        from mlflow.entities import Metric, RunTag  # noqa: PLC0415

        metrics = [Metric(k, v, r.timestamp_ms, r.step) for r in rows for k, v in r.values.items()]
        # The tag travels in the same request, so the run's metrics and its last step agree.
        steps = [r.step for r in rows if not r.system]
        tags = [RunTag(LAST_STEP_TAG, str(max(steps)))] if steps else []

        def attempt() -> None:
            try:
                self._client.log_batch(self.ref.run_id, metrics=metrics, tags=tags)
            except Exception as e:
                if _unanswered(e):   # the store may apply this request yet: these rows may be in MLflow
                    for r in rows:
                        r.unanswered = True
                raise

        retry(attempt, attempts, "log_batch", lambda: self._deadline)
        if steps:
            self._last_step = max(steps)


def start_system_metrics(uri: str, run_id: str, retries: int = 3) -> StageLogger:
    """A sampler of this process's CPU, memory and GPU into run ``run_id``; ``.close()`` stops it."""
    return StageLogger(StageRef(uri, run_id, -1, 1, retries, True))


def _drain(q: queue.Queue, timeout: float = 0.0) -> list:
    """Everything in ``q``, waiting up to ``timeout`` s for the first item."""
    items = []
    try:
        items.append(q.get(timeout=timeout) if timeout > 0 else q.get_nowait())
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items


def _unanswered(e: BaseException) -> bool:
    """Whether a request that failed with ``e`` may yet be applied: it went out and no answer came (a timeout,
    a reset connection). A refused connection never sent it; an error answer means the store did not apply it
    (its write is one transaction)."""
    text = str(e)
    return not ("Connection refused" in text or "NewConnectionError" in text or _answered(e))


def _answered(e: BaseException) -> bool:
    """The store answered the request, with an error (MLflow's client names a request that got no answer
    ``API request to URL failed with [timeout] exception ...``)."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    return isinstance(e, MlflowException) and not _NO_ANSWER.match(str(e))


def _refused_for_good(e: BaseException) -> bool:
    """The store answered that this request can never succeed (a 4xx: no such run, a bad value): trying it
    again is pointless."""
    return _answered(e) and 400 <= e.get_http_status_code() < 500


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
