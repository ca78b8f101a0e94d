"""The pipeline runner: a Ray Train worker group, one worker per stage (one GPU each on a cluster).

``ray.init()`` joins the cluster given by ``vgim train --address`` (or, in a ``ray job submit`` driver, the
one RAY_ADDRESS names) and otherwise starts Ray on this machine for the length of the run: the same code from
a laptop to a cluster. Ray Train places the workers, sets up torch.distributed (gloo on CPU, NCCL on GPU) and,
when a worker dies, restarts the whole group, which resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import asyncio
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
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vgim_dist.config import Config
from vgim_dist.pipeline.worker import STAGE_STATS, STEP_FILE, train_stage
from vgim_dist.storage import is_local, open_dir
from vgim_dist.tracking import StageRef
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
        use_gpu = self.use_gpu()
        cpus = cfg.pipeline.cpus_per_stage or min(1.0, ray.cluster_resources().get("CPU", 1.0) / workers)
        stop = StopFlag.remote()
        trainer = TorchTrainer(
            train_stage,
            train_loop_config={"cfg": cfg, "stop": stop.wait.remote(), "stage_refs": self.stage_refs},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(
                # A new Ray Train run per invocation: where to start is read from run.dir, never from Ray
                # Train's memory of an earlier invocation.
                name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
                **self.ray_storage(),
                failure_config=FailureConfig(max_failures=cfg.pipeline.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        log.info("pipeline: %d stages %s, replicas %s, on Ray %s, %.2g CPUs%s per worker, in-flight window %d",
                 stages, cfg.stage_modules(), cfg.stage_replicas(), ray.__version__, cpus,
                 " + 1 GPU" if use_gpu else "", cfg.pipeline.in_flight)
        log.info("pipeline: waiting for Ray Train to start %d workers; each then prints its stage's steps", workers)
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


def stage_stats(rows: list[dict], stage_modules: list[list[int]]) -> list[dict]:
    """Per stage: its modules and the mean of each of its statistics over the logged rows."""
    return [{"modules": modules, **{k: sum(r[f"stage.{s}.{k}"] for r in rows) / len(rows) for k in STAGE_STATS}}
            if rows else {"modules": modules} for s, modules in enumerate(stage_modules)]
