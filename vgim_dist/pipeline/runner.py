"""The pipeline runner: a Ray Train worker group, one worker per stage (one GPU each on a cluster).

``ray.init()`` joins the cluster given by ``vgim train --address`` (or, in a ``ray job submit`` driver, the
one RAY_ADDRESS names) and otherwise starts Ray on this machine for the length of the run: the same code from
a laptop to a cluster. Ray Train places the workers, sets up torch.distributed (gloo on CPU, NCCL on GPU) and,
when a worker dies, restarts the whole group, which resumes from the newest committed checkpoint. When the
restarted group finds no room for ``pipeline.replan_after_s`` seconds (a node lost and not replaced), the
driver re-plans the stages for the workers that fit and starts again from the newest committed checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
from ray.train.v2.api.exceptions import ControllerError

from vgim_dist import ray_session
from vgim_dist.config import Config
from vgim_dist.pipeline.replan import Replan, fewer_workers
from vgim_dist.pipeline.worker import STAGE_STATS, STEP_FILE, train_stage
from vgim_dist.storage import is_local, open_dir
from vgim_dist.tracking import StageRef
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import Interrupted
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


class PipelineRunner:
    def __init__(self, cfg: Config, stage_refs: list[StageRef | None] | None = None, address: str = "",
                 replan: Replan | None = None):
        self.cfg = cfg
        self.stage_refs = stage_refs or [None] * len(cfg.stage_modules())   # MLflow run per stage, if tracked
        self.address = address      # Ray cluster to join; empty: a `ray job submit` driver's, else a local one
        self.checkpoints = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.data.endpoint_url)
        self.replan = replan or fewer_workers   # the layout for fewer workers, when some are lost
        self.replans: list[dict] = []   # each re-plan after lost workers: when, from what, to what
        self.resources: dict[str, float] = {}   # what each worker of the current plan reserves

    def run(self, start: int = 0) -> dict:
        """Train from checkpoint ``start`` (0: fresh) to ``run.steps``."""
        cfg = self.cfg
        if start:
            log.info("resuming from step %d", start)
        owns_ray = ray_session.connect(self.address)
        try:
            step = self.fit_elastic(start)
        finally:
            if owns_ray:
                ray.shutdown()
        metrics = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.data.endpoint_url)
        metrics.resume(step)
        if step < cfg.run.steps:
            raise Interrupted(f"stopped at step {step}; checkpoint saved, continue with --resume")
        cfg = self.cfg   # re-planned, if workers were lost
        return {"steps": step, "final": metrics.rows[-1] if metrics.rows else {},
                "stages": cfg.stage_modules(), "replicas": cfg.stage_replicas(), "replans": self.replans,
                "stage_stats": stage_stats(metrics.rows, cfg.stage_modules())}

    def fit_elastic(self, start: int) -> int:
        """`fit`, re-planned for the workers left whenever a worker group finds no room for
        ``pipeline.replan_after_s`` seconds; the step of the run's last checkpoint."""
        failed_starts = 0
        while True:
            try:
                return self.fit(start)
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

    def worker_resources(self, workers: int) -> dict[str, float]:
        """What Ray reserves for each of ``workers`` workers."""
        cpus = self.cfg.pipeline.cpus_per_stage or min(1.0, ray.cluster_resources().get("CPU", 1.0) / workers)
        return {"CPU": cpus, **({"GPU": 1.0} if self.use_gpu() else {})}

    def fit(self, start: int) -> int:
        """Train from ``start`` on a Ray Train worker group; the step of the run's last checkpoint."""
        cfg = self.cfg
        stages, workers = len(cfg.stage_modules()), sum(cfg.stage_replicas())
        use_gpu = self.use_gpu()
        resources = self.resources = self.worker_resources(workers)
        if cfg.pipeline.replan_after_s:
            # Ray Train gives up placing a worker group after this long (propagated to its controller), and
            # with no controller retries fit() raises, for fit_elastic to re-plan.
            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.pipeline.replan_after_s)
        # On the driver's node: a flag on a node that is lost would read as set, and stop the run.
        stop = StopFlag.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        trainer = TorchTrainer(
            train_stage,
            train_loop_config={"cfg": cfg, "stop": stop.wait.remote(), "stage_refs": self.stage_refs},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                         placement_strategy=PLACEMENT[cfg.pipeline.placement]),
            run_config=RunConfig(
                # A new Ray Train run per invocation: where to start is read from run.dir, never from Ray
                # Train's memory of an earlier invocation.
                name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{len(self.replans)}",
                **self.ray_storage(),
                failure_config=FailureConfig(max_failures=cfg.pipeline.max_failures,
                                             controller_failure_limit=0 if cfg.pipeline.replan_after_s else -1),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        log.info("pipeline: %d stages %s, replicas %s, on Ray %s, %.2g CPUs%s per worker, placement %s, "
                 "in-flight window %d", stages, cfg.stage_modules(), cfg.stage_replicas(), ray.__version__,
                 resources["CPU"], " + 1 GPU" if use_gpu else "", cfg.pipeline.placement, cfg.pipeline.in_flight)
        with stop_on_sigint(stop):
            result = fit_in_thread(trainer)
        if result.checkpoint is None:   # nothing left to train: already at run.steps
            return start
        with result.checkpoint.as_directory() as d:
            return json.loads(Path(d, STEP_FILE).read_text())["step"]

    def use_gpu(self) -> bool:
        gpus = ray.cluster_resources().get("GPU", 0)
        if self.cfg.run.device == "cuda" and not gpus:
            raise RuntimeError("run.device: cuda requested but the Ray cluster has no GPU")
        return self.cfg.run.device == "cuda" or (self.cfg.run.device == "auto" and gpus > 0)

    def ray_storage(self) -> dict:
        """Ray Train's own storage (its run state and the step markers reported to it): ``<run.dir>/ray``,
        shared by every node when run.dir is on S3."""
        fs, root = open_dir(self.cfg.run.dir, self.cfg.data.endpoint_url)
        if is_local(fs):
            return {"storage_path": os.path.abspath(f"{root}/ray")}
        return {"storage_path": f"{root}/ray",
                "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


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
