"""The pipeline runner: a Ray Train worker group, one worker per stage (one GPU each on a cluster).

``ray.init()`` joins the cluster given by ``vgim train --address`` (or, in a ``ray job submit`` driver, the
one RAY_ADDRESS names) and otherwise starts Ray on this machine for the length of the run: the same code from
a laptop to a cluster. Ray Train places the workers, sets up torch.distributed (gloo on CPU, NCCL on GPU) and,
when a worker dies, restarts the whole group, which resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager

import ray
from ray.train import FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vgim_dist.config import Config
from vgim_dist.pipeline.worker import STAGE_STATS, train_stage
from vgim_dist.storage import StorageFault, is_local, open_dir
from vgim_dist.tracking import StageRef
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import Interrupted
from vgim_dist.train.metrics import MetricsLog

log = logging.getLogger(__name__)


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
    def __init__(self, cfg: Config, stage_refs: list[StageRef | None] | None = None, address: str = ""):
        self.cfg = cfg
        self.stage_refs = stage_refs or [None] * len(cfg.stage_modules())   # MLflow run per stage, if tracked
        self.address = address      # Ray cluster to join; empty: a `ray job submit` driver's, else a local one

    def run(self, start: int = 0) -> dict:
        """Train from checkpoint ``start`` (0: fresh) to ``run.steps``."""
        cfg = self.cfg
        if start:
            log.info("resuming from step %d", start)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # Joining a cluster: the address given, or the one Ray sets for a submitted job's driver. Starting
            # one here: it listens on localhost only.
            address = self.address or os.environ.get("RAY_ADDRESS", "")
            log.info("Ray: %s", f"joining the cluster at {address}" if address else
                     "starting a local instance (10-30 s: its GCS, raylet and dashboard)")
            ray.init(**({"address": address} if address else {"_node_ip_address": "127.0.0.1"}))
        try:
            step = self.fit(start)
        finally:
            if owns_ray:
                ray.shutdown()
        metrics = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.data.endpoint_url)
        metrics.resume(step)
        if step < cfg.run.steps:
            raise Interrupted(f"stopped at step {step}; checkpoint saved, continue with --resume")
        return {"steps": step, "final": metrics.rows[-1] if metrics.rows else {},
                "stage_stats": stage_stats(metrics.rows, cfg.stage_modules())}

    def fit(self, start: int) -> int:
        """Train from ``start`` on a Ray Train worker group; the step of the run's last checkpoint."""
        cfg = self.cfg
        stages, workers = len(cfg.stage_modules()), sum(cfg.stage_replicas())
        use_gpu, resources = placement(cfg, ray.cluster_resources())
        stop, fault = StopFlag.remote(), FatalFault.remote()
        trainer = TorchTrainer(
            train_stage,
            train_loop_config={"cfg": cfg, "stop": stop.wait.remote(), "stage_refs": self.stage_refs,
                               "fault": fault},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                # A new Ray Train run per invocation: where to start is read from run.dir, never from Ray
                # Train's memory of an earlier invocation.
                name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                **self.ray_storage(),
                failure_config=FailureConfig(max_failures=cfg.pipeline.max_failures),
            ),
        )
        log.info("pipeline: %d stages %s, replicas %s, on Ray %s, %.2g CPUs%s per worker, in-flight window %d",
                 stages, cfg.stage_modules(), cfg.stage_replicas(), ray.__version__, resources["CPU"],
                 f" + {resources['GPU']:g} GPU" if use_gpu else "", cfg.pipeline.in_flight)
        log.info("pipeline: waiting for Ray Train to start %d workers; each then prints its stage's steps", workers)
        with stop_on_sigint(stop):
            fit_in_thread(trainer)
        if message := ray.get(fault.get.remote()):
            raise StorageFault(message)
        # run.dir, not Ray Train, records the checkpoints: the run ends at the newest committed one
        return CheckpointManager(cfg.run.dir, endpoint_url=cfg.data.endpoint_url).latest() or start

    def ray_storage(self) -> dict:
        """Ray Train's own state, on the driver's disk: ``<run.dir>/ray`` for a local run.dir, else Ray's default
        (``~/ray_results``). Its controller lives beside the driver and fails when it cannot write this state,
        so it never goes where an outage of a remote run store could reach it; workers write nothing there."""
        fs, root = open_dir(self.cfg.run.dir, self.cfg.data.endpoint_url)
        return {"storage_path": os.path.abspath(f"{root}/ray")} if is_local(fs) else {}


def placement(cfg: Config, cluster: dict[str, float]) -> tuple[bool, dict[str, float]]:
    """(use_gpu, resources per worker) for the worker group on a cluster with ``cluster`` resources.

    A worker asks for ``pipeline.gpus_per_stage`` of a GPU (default a whole one): with 0.5, two stage workers
    share each GPU, so a pipeline of more stages than GPUs still places (Ray packs fractional requests onto
    one device). CPUs: ``pipeline.cpus_per_stage``, default an equal share of the cluster's, at most one.
    """
    workers = sum(cfg.stage_replicas())
    gpus = cluster.get("GPU", 0)
    if cfg.run.device == "cuda" and not gpus:
        raise RuntimeError("run.device: cuda requested but the Ray cluster has no GPU")
    use_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and gpus > 0)
    resources = {"CPU": cfg.pipeline.cpus_per_stage or min(1.0, cluster.get("CPU", 1.0) / workers)}
    if use_gpu:
        share = cfg.pipeline.gpus_per_stage or 1.0
        if workers * share > gpus + 1e-9:
            raise RuntimeError(f"pipeline: {workers} workers x {share:g} GPU each need {workers * share:g} GPUs, "
                               f"the Ray cluster has {gpus:g}; set pipeline.gpus_per_stage to at most "
                               f"{gpus / workers:.3g} to share them, or plan with pipeline.stages: auto")
        resources["GPU"] = share
    return use_gpu, resources


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


def stage_stats(rows: list[dict], stage_modules: list[list[int]]) -> list[dict]:
    """Per stage: its modules and the mean of each of its statistics over the logged rows."""
    return [{"modules": modules, **{k: sum(r[f"stage.{s}.{k}"] for r in rows) / len(rows) for k in STAGE_STATS}}
            if rows else {"modules": modules} for s, modules in enumerate(stage_modules)]
