"""The pipeline runner: a Ray Train worker group, one worker per stage (one GPU each on a cluster).

``ray.init()`` joins the cluster given by ``vgim train --address`` (or, in a ``ray job submit`` driver, the
one RAY_ADDRESS names) and otherwise starts Ray on this machine for the length of the run, reachable from this
machine only (``local.py``): the same code from a laptop to a cluster. Ray Train places the workers, sets up
torch.distributed (gloo on CPU, NCCL on GPU) and, when a worker dies, restarts the whole group, which resumes
from the newest committed checkpoint. When the restarted group finds no room for ``pipeline.replan_after_s``
seconds (a node lost and not replaced), the driver re-plans the stages for the workers that fit and starts
again from the newest committed checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager, nullcontext

import ray
from ray.train import FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vgim_dist.config import Config
from vgim_dist.layout import Hardware, ResolvedRun, resolve_run
from vgim_dist.pipeline.local import local_only_ray
from vgim_dist.pipeline.replan import Replan, fewer_workers
from vgim_dist.pipeline.restarts import RestartReporter, train_log_level
from vgim_dist.pipeline.worker import STAGE_STATS, WorkerArgs, train_stage
from vgim_dist.ray_private import ControllerError, WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
from vgim_dist.ray_session import quiet_local_start
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import StorageFault
from vgim_dist.tracking import StageRef
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import check_finished
from vgim_dist.train.metrics import MetricsLog

log = logging.getLogger(__name__)
PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver on Ctrl-C; stage 0 polls ``wait()``'s result between steps."""

    def __init__(self):
        self.event = asyncio.Event()

    async def set(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


@ray.remote(num_cpus=0)
class FatalFault:
    """The first fault a worker hit that no restart can fix (its one-line message); restarted workers that find
    one end at once, and the driver raises it."""

    def __init__(self):
        self.message = ""

    def record(self, message: str) -> None:
        self.message = self.message or message

    def get(self) -> str:
        return self.message


class PipelineRunner:
    def __init__(self, cfg: Config, stage_refs: list[StageRef | None] | None = None, address: str = "",
                 replan: Replan | None = None, monitor=None, run_dir: RunDir | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or RunDir.of(cfg)
        self.monitor = monitor  # unstarted `ProbeMonitor` (eval.every): the worker that logs rows starts it
        self.stage_refs = stage_refs or [None] * len(cfg.stage_modules())   # MLflow run per stage, if tracked
        self.address = address      # Ray cluster to join; empty: a `ray job submit` driver's, else a local one
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep)
        self.replan = replan or fewer_workers   # the layout for fewer workers, when some are lost
        self.replans: list[dict] = []   # each re-plan after lost workers: when, from what, to what
        self.resources: dict[str, float] = {}   # what each worker of the current plan reserves

    def run(self, start: int = 0) -> dict:
        """Train from checkpoint ``start`` (0: fresh) to ``run.steps``."""
        cfg = self.cfg
        if start:
            log.info("resuming from step %d", start)
        with ExitStack() as stack:
            torch_config = None     # Ray Train's own torch setup, on a cluster
            if not ray.is_initialized():
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                # Joining a cluster: the address given, or the one Ray sets for a submitted job's driver.
                address = self.address or os.environ.get("RAY_ADDRESS", "")
                if not address:
                    torch_config = stack.enter_context(local_only_ray())
                log.info("Ray: %s", f"joining the cluster at {address}" if address else
                         "starting a local instance (10-30 s: its GCS, raylet and dashboard)")
                with nullcontext() if address else quiet_local_start():
                    ray_info = ray.init(address=address or "local")  # never attach to another session by chance
                if not address:
                    auth = os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
                    log.info("Ray: local instance on 127.0.0.1, token authentication %s; dashboard at http://%s",
                             "on" if auth else "off (RAY_AUTH_MODE)", ray_info.dashboard_url)
                stack.callback(ray.shutdown)
            step = self.fit_elastic(start, torch_config)
        metrics = MetricsLog(self.run_dir, cfg.run.steps)
        metrics.resume(step)
        check_finished(step, cfg.run.steps)
        cfg = self.cfg   # re-planned, if workers were lost
        return {"steps": step, "final": metrics.rows[-1] if metrics.rows else {},
                "stages": cfg.stage_modules(), "replicas": cfg.stage_replicas(), "replans": self.replans,
                "stage_stats": stage_stats(metrics.rows, cfg.stage_modules())}

    def fit_elastic(self, start: int, torch_config: TorchConfig | None = None) -> int:
        """`fit`, re-planned for the workers left whenever a worker group finds no room for
        ``pipeline.replan_after_s`` seconds; the step of the run's last checkpoint."""
        failed_starts = 0
        while True:
            try:
                return self.fit(start, torch_config)
            except ControllerError as e:
                # Controller errors are not retried inside Ray Train when re-planning is on: a group that
                # failed while starting (a node lost meanwhile) is started again here, within max_failures.
                if isinstance(e.controller_failure, WorkerGroupStartupFailedError):
                    failed_starts += 1
                    if failed_starts > self.cfg.pipeline.max_failures >= 0:
                        raise
                    log.warning("pipeline: the worker group failed to start (%s); starting it again", e)
                    continue
                if not isinstance(e.controller_failure, WorkerGroupStartupTimeoutError):
                    raise
                old = {"stages": self.cfg.stage_modules(), "replicas": self.cfg.stage_replicas()}
                room = placeable_workers(self.resources, self.cfg.pipeline.placement)
                try:
                    stages, replicas = self.replan(old["stages"], old["replicas"], max(1, room))
                except ValueError as why:   # the planner found no layout that fits: merge instead
                    log.warning("pipeline: re-planning: %s; merging stages instead", why)
                    stages, replicas = fewer_workers(old["stages"], old["replicas"], max(1, room))
                new = {"stages": stages, "replicas": replicas}
                start = self.checkpoints.latest() or 0
                if new == old or sum(replicas) > max(1, room):
                    # A lost node not yet declared dead, or resources others hold: wait again.
                    log.warning("pipeline: no room for %d workers for %g s, though the live nodes hold %d; "
                                "waiting again", sum(old["replicas"]), self.cfg.pipeline.replan_after_s, room)
                    continue
                log.warning("pipeline: room for %d of %d workers for %g s; re-planned %s -> %s, continuing from "
                            "step %d", room, sum(old["replicas"]), self.cfg.pipeline.replan_after_s, old, new, start)
                self.replans.append({"step": start, "from": old, "to": new, "workers_placeable": room})
                self.stage_refs = [self.stage_refs[self.stage_of(s[0])] for s in stages]
                self.cfg = dataclasses.replace(self.cfg, pipeline=dataclasses.replace(
                    self.cfg.pipeline, stages=stages, replicas=replicas))

    def stage_of(self, module: int) -> int:
        """The stage holding ``module`` in the current plan."""
        return next(s for s, modules in enumerate(self.cfg.stage_modules()) if module in modules)

    def fit(self, start: int, torch_config: TorchConfig | None = None) -> int:
        """Train from ``start`` on a Ray Train worker group; the step of the run's last checkpoint."""
        cfg = self.cfg
        run = placed(cfg, ray.cluster_resources())   # this plan on this cluster (re-placed after a re-plan)
        stages, workers, use_gpu = len(run.stages), run.workers, run.use_gpu
        self.resources = resources = run.resources()
        if cfg.pipeline.replan_after_s:
            # Ray Train gives up placing a worker group after this long (propagated to its controller), and
            # with no controller retries fit() raises, for fit_elastic to re-plan.
            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.pipeline.replan_after_s)
        # Ray Train's drain watcher only logs node drains (recovery here is from run.dir's checkpoints), and its
        # actor's constructor logs an error-level line on every start (ray-project/ray#53727). Ray Train passes
        # the variable on to its controller; set it to 1 to have the watcher back.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray Train's print patch logs a worker's prints again through its root logger: each stage line twice.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        # On the driver's node: an actor on a node that is lost would read as stopped or faulted.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        stop, fault = StopFlag.options(scheduling_strategy=here).remote(), FatalFault.options(
            scheduling_strategy=here).remote()
        restarts = RestartReporter(cfg, here)   # one console line per restart; Ray Train's tracebacks to its files
        args = WorkerArgs(cfg=cfg, run=run, run_dir=self.run_dir, stop=stop.wait.remote(), stage_refs=self.stage_refs,
                          fault=fault, monitor=self.monitor)
        trainer = TorchTrainer(
            functools.partial(train_stage, args),
            torch_config=torch_config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                         placement_strategy=PLACEMENT[cfg.pipeline.placement]),
            run_config=RunConfig(
                # A new Ray Train run per invocation: where to start is read from run.dir, never from Ray
                # Train's memory of an earlier invocation.
                name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{len(self.replans)}",
                **self.ray_storage(),
                failure_config=FailureConfig(max_failures=cfg.pipeline.max_failures,
                                             controller_failure_limit=0 if cfg.pipeline.replan_after_s else -1),
                callbacks=[restarts.callback], logging_config=train_log_level(),
            ),
        )
        log.info("pipeline: %d stages %s, replicas %s, on Ray %s, %.2g CPUs%s per worker, placement %s, "
                 "in-flight window %d", stages, cfg.stage_modules(), cfg.stage_replicas(), ray.__version__,
                 resources["CPU"], f" + {resources['GPU']:g} GPU" if use_gpu else "", cfg.pipeline.placement,
                 cfg.pipeline.in_flight)
        log.info("pipeline: waiting for Ray Train to start %d workers; each then prints its stage's steps", workers)
        with stop_on_sigint(stop), restarts.shown():
            fit_in_thread(trainer)
        if message := ray.get(fault.get.remote()):
            raise StorageFault(message)
        # run.dir, not Ray Train, records the checkpoints: the run ends at the newest committed one
        return self.checkpoints.latest() or start

    def ray_storage(self) -> dict:
        """Ray Train's own state, on the driver's disk: ``<run.dir>/ray`` for a local run.dir, else Ray's default
        (``~/ray_results``). Its controller lives beside the driver and fails when it cannot write this state,
        so it never goes where an outage of a remote run store could reach it; workers write nothing there."""
        return {"storage_path": os.path.abspath(self.run_dir.path("ray"))} if self.run_dir.local else {}


def placed(cfg: Config, cluster: dict[str, float]) -> ResolvedRun:
    """``cfg``'s resolved run on a Ray cluster with ``cluster`` resources (vgim_dist/layout.py)."""
    return resolve_run(cfg, None).placed(Hardware(cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)))


def placement(cfg: Config, cluster: dict[str, float]) -> tuple[bool, dict[str, float]]:
    """(use_gpu, resources per worker) for the worker group on a cluster with ``cluster`` resources."""
    run = placed(cfg, cluster)
    return run.use_gpu, run.resources()


def fit_in_thread(trainer: TorchTrainer) -> Result:
    """``trainer.fit()`` from a helper thread, where Ray Train installs no SIGINT handler of its own (from the
    main thread it would catch Ctrl-C and abort the workers mid-step). The main thread waits, and takes Ctrl-C."""
    future: Future[Result] = Future()

    def fit() -> None:
        try:
            future.set_result(trainer.fit())
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            future.set_exception(e)

    # A daemon: after a second Ctrl-C the main thread leaves without it, and ray.shutdown() ends the workers.
    threading.Thread(target=fit, name="ray-train-fit", daemon=True).start()
    return future.result()


@contextmanager
def stop_on_sigint(stop: ray.actor.ActorHandle):
    """First Ctrl-C: every stage finishes its step and checkpoints. A second one interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def on_sigint(signum, frame) -> None:
        log.warning("Ctrl-C: stopping after the step in flight and checkpointing (Ctrl-C again to abort)")
        stop.set.remote()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def placeable_workers(resources: dict[str, float], placement: str) -> int:
    """How many workers needing ``resources`` each the cluster's live nodes hold (one per node at most with
    strict_spread)."""
    total = 0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        have = node["Resources"]
        fits = min(int(have.get(k, 0.0) / v + 1e-9) for k, v in resources.items() if v > 0)
        total += min(fits, 1) if placement == "strict_spread" else fits
    return total


def stage_stats(rows: list[dict], stage_modules: list[list[int]]) -> list[dict]:
    """Per stage: its modules and the mean of each of its statistics over the logged rows of this split (a
    re-planned run logged the rows before its re-plan under another split)."""
    out = []
    for s, modules in enumerate(stage_modules):
        n = len(stage_modules)
        own = [r for r in rows if f"stage.{n - 1}.step_time_s" in r and f"stage.{n}.step_time_s" not in r]
        out.append({"modules": modules, **({k: sum(r[f"stage.{s}.{k}"] for r in own) / len(own)
                                             for k in STAGE_STATS} if own else {})})
    return out
