"""One console line per worker-group restart; Ray Train's tracebacks stay in Ray's log files.

When a worker dies, Ray Train logs the failure from every process it concerns: each surviving worker its
training function's traceback (``ray.train`` at ERROR), the controller its failure-policy decision with the
whole worker-group error (at INFO, each worker's traceback inside), about two hundred lines on the driver's
console before training goes on. Ray Train's console level (``RunConfig.logging_config``) is set above
those records, so its console handlers drop them, while its system log files, which take every level, keep
them: ``<Ray session>/logs/train/ray-train-sys-worker-*.log`` (a worker's) and
``ray-train-sys-controller-*.log``. ``VGIM_RAY_TRAIN_LOG_LEVEL`` (default CRITICAL) sets that level; INFO gives
Ray Train's console output back.

Instead, a Ray Train callback on the controller reports each failure to a small actor, and the driver logs it
as one line: which stage failed (the worker that died, else the first that raised something other than a
closed link), which attempt starts,
and the step it resumes from (the newest intact committed checkpoint in ``run.dir``, which every rank of the
new group loads).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import ray
from ray.exceptions import RayActorError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.config import LoggingConfig

from vgim_dist.config import Config
from vgim_dist.pipeline.topology import Topology
from vgim_dist.train.checkpoint import CheckpointManager

log = logging.getLogger(__name__)
LEVEL_ENV = "VGIM_RAY_TRAIN_LOG_LEVEL"


@ray.remote(num_cpus=0)
class RestartLines:
    """The lines the controller's callback says, in order, until the driver takes them."""

    def __init__(self):
        self.lines: asyncio.Queue[str] = asyncio.Queue()

    async def say(self, line: str | None) -> None:
        await self.lines.put(line)

    async def next(self) -> str | None:
        return await self.lines.get()


class ReportRestarts(UserCallback):
    """On the controller: each failure of the worker group, as one line for the driver."""

    def __init__(self, cfg: Config, lines: ray.actor.ActorHandle):
        self.cfg, self.lines, self.failures = cfg, lines, 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        # Ray Train turns an exception here into a controller error that ends the run: a report never may.
        self.failures += 1
        try:
            line = restart_line(self.cfg, worker_exceptions, self.failures, _resume_step(self.cfg),
                                _train_log_dir(), dead_ranks(self.cfg))
        except Exception as e:  # noqa: BLE001
            line = f"pipeline: the worker group failed (failure {self.failures}; cannot say more: {e!r})"
        try:
            ray.get(self.lines.say.remote(line), timeout=30)
        except Exception:  # noqa: BLE001 - the driver is gone or going: nobody to tell
            pass


def restart_line(cfg: Config, errors: dict[int, BaseException], failures: int, step: int, logs: str,
                 dead: list[int] = ()) -> str:
    """``pipeline: stage 1 (rank 1) failed (worker process died); attempt 2 of 4, resuming from step 20 (Ray's
    traceback: <dir>)``; after the last allowed failure, ``...; no restarts left (pipeline.max_failures = 3)``."""
    rank = culprit(errors, dead)
    topo = Topology(tuple(cfg.stage_replicas()), rank)
    who = f"stage {topo.stage}" + (f" replica {topo.replica}" if cfg.stage_replicas()[topo.stage] > 1 else "")
    allowed = cfg.pipeline.max_failures
    if 0 <= allowed < failures:
        then = f"no restarts left (pipeline.max_failures = {allowed})"
    else:
        then = (f"attempt {failures + 1}" + (f" of {allowed + 1}" if allowed >= 0 else "")
                + f", resuming from step {step}")
    where = f" (Ray's traceback: {logs})" if logs else ""
    what = _kind(errors[rank]) if rank in errors else "worker process died"
    return f"pipeline: {who} (rank {rank}) failed ({what}); {then}{where}"


def culprit(errors: dict[int, BaseException], dead: list[int] = ()) -> int:
    """The rank whose failure caused the others: one whose process died or stopped answering (Ray's own error,
    not the training function's; or found dead, ``dead``), else one that raised something other than a link
    error, else the lowest rank that raised. A killed worker's neighbours often raise (a closed link) before
    Ray's health check finds it gone."""
    died = [r for r, e in errors.items() if not _raised_by_training(e)]
    own = [r for r, e in errors.items() if not _link_error(e)]     # e.g. a full disk, not the closed link it left
    return min(died or list(dead) or own or errors)


def _link_error(e: BaseException) -> bool:
    """An error of torch.distributed's links (gloo, NCCL): what a worker's neighbours raise when it fails."""
    inner = getattr(e, "_base_exc", e)
    return type(inner).__name__.startswith("Dist") or any(w in str(inner) for w in ("gloo", "NCCL", "Connection"))


def dead_ranks(cfg: Config) -> list[int]:
    """Ranks whose process, as ``<run.dir>/workers/`` records it on this node, is gone (the controller runs on
    the driver's node: on one machine, every worker's)."""
    from vgim_dist.storage import open_dir  # noqa: PLC0415

    here, dead = ray.get_runtime_context().get_node_id(), []
    try:
        fs, root = open_dir(cfg.run.dir, cfg.data.endpoint_url)
        infos = [json.loads(fs.cat_file(path)) for path in fs.glob(f"{root}/workers/stage-*.json")]
    except Exception:  # noqa: BLE001 - only a better guess of the culprit is lost
        return []
    topo = Topology(tuple(cfg.stage_replicas()), 0)
    for info in infos:
        if info.get("node_id") != here or info.get("stage", topo.stages) >= topo.stages:
            continue
        try:
            alive = psutil.Process(info["pid"]).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            dead.append(topo.first(info["stage"]) + info.get("replica", 0))
    return sorted(dead)


def _raised_by_training(e: BaseException) -> bool:
    """Not Ray's word that the worker died or stopped answering (Ray Train unwraps what the function raised)."""
    return not isinstance(e, (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError, RayActorError))


def _kind(e: BaseException) -> str:
    """The error's type, and for one the training function raised its first line: ``ActorDiedError``,
    ``StorageFault: <path>: no space left on device ...``."""
    inner = getattr(e, "_base_exc", None) or getattr(e, "health_check_failure", None) or e
    first = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    name = type(inner).__name__
    return f"{name}: {first[:300]}" if first and _raised_by_training(e) else name


def _resume_step(cfg: Config) -> int:
    try:
        return CheckpointManager(cfg.run.dir, endpoint_url=cfg.data.endpoint_url).newest_intact() or 0
    except Exception:  # noqa: BLE001 - the restarted group reports a damaged store itself
        return 0


def _train_log_dir() -> str:
    from ray.train.v2._internal.logging.logging import LoggingManager  # noqa: PLC0415

    return LoggingManager.get_log_directory() or ""


def train_log_level() -> LoggingConfig:
    """Ray Train's console level: above its failure records (they stay in its system log files)."""
    return LoggingConfig(log_level=os.environ.get(LEVEL_ENV, "CRITICAL"))


class RestartReporter:
    """``callback`` goes to ``RunConfig(callbacks=...)``; inside ``shown()`` its lines are logged on the driver."""

    def __init__(self, cfg: Config, scheduling_strategy):
        self.lines = RestartLines.options(scheduling_strategy=scheduling_strategy).remote()
        self.callback = ReportRestarts(cfg, self.lines)

    @contextmanager
    def shown(self) -> Iterator[None]:
        def show() -> None:
            while True:
                try:
                    line = ray.get(self.lines.next.remote())
                except Exception:  # noqa: BLE001 - the actor is gone: the run is over
                    return
                if line is None:
                    return
                log.warning("%s", line)

        thread = threading.Thread(target=show, name="restart-lines", daemon=True)
        thread.start()
        try:
            yield
        finally:
            try:
                ray.get(self.lines.say.remote(None), timeout=10)   # after every line said: the thread ends
                thread.join(timeout=10)
            finally:
                ray.kill(self.lines)
