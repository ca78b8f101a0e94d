"""One pipeline stage, run by each Ray Train worker (world rank = stage index): the `StageLoop`
(train/loop.py) plugged into the transport.

Stage 0 reads batches itself; every other stage trains on what its producer streams to it. Each stage takes
exactly the reference runner's steps on exactly the reference runner's inputs, so a CPU run ends bitwise
equal to it. Every ``checkpoint.every`` steps all stages save the same step; rank 0 commits once all have
written and reports it to Ray Train. A group that Ray Train restarts after a failure resumes, every rank
alike, from the newest intact committed checkpoint. Ray Train itself is told nothing of checkpoints: run.dir
is the only record of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vgim_dist.config import Config
from vgim_dist.layout import ResolvedRun
from vgim_dist.parallel.data_parallel import ReplicaGroup
from vgim_dist.pipeline.links import Fanout, Gather
from vgim_dist.pipeline.topology import Topology
from vgim_dist.pipeline.transport import Receiver, Sender, device_identity, link_channel
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import StorageFault
from vgim_dist.tracking import StageLogger, StageRef
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import STAGE_STATS, MetricsLayout, StageLoop
from vgim_dist.train.lower import frozen_weights
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.parts import GatheredCommit, Nowhere, SourceInput, zero_partitions
from vgim_dist.train.stage import Stage, configure_torch

__all__ = ["STAGE_STATS", "WorkerArgs", "train_stage"]


def see_run_dir(run_dir: RunDir) -> None:
    """Fail at once, naming run.dir, when this worker cannot see the run directory the driver prepared:
    otherwise its checkpoints would go where the driver never looks. No restart can fix that."""
    if not run_dir.exists(run_dir.config):
        raise StorageFault(f"run.dir {run_dir.uri}: not visible from this worker (node "
                           f"{ray.util.get_node_ip_address()}, no config.yaml there); on a cluster of several nodes "
                           "run.dir must be storage every node shares, e.g. s3://bucket/runs/name")


@dataclasses.dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker of the group."""

    cfg: Config
    run: ResolvedRun                    # the layout, placed on the cluster: stages, replicas, threads, resources
    run_dir: RunDir
    stop: ray.ObjectRef                 # resolves when the driver asks the run to stop (Ctrl-C)
    stage_refs: list[StageRef | None]   # MLflow run per stage, if tracked
    fault: ray.actor.ActorHandle        # the driver's `FatalFault`: a fault no restart can fix
    monitor: object | None = None       # an unstarted `ProbeMonitor`: the background evaluator (eval.every)


def replica_groups(topo: Topology, devices: list[str]) -> tuple[ReplicaGroup | None, dist.ProcessGroup | None]:
    """This worker's replica group (data, and gloo control) if its stage is replicated; ``devices``: each
    rank's device identity. Every rank takes part in creating every group, in the same order; each keeps its
    own stage's."""
    replicas, replica_control = None, None
    for t, n in enumerate(topo.replicas):
        if n > 1:
            ranks = topo.ranks(t)
            shared = {devices[r] for r in ranks}
            if len(shared) < n and any(d.startswith("cuda") for d in shared):
                raise RuntimeError(f"pipeline.replicas: the {n} replicas of stage {t} share GPUs ({sorted(shared)}); "
                                   "replicas need a device each (NCCL rejects two ranks on one device): lower "
                                   "pipeline.gpus_per_stage's sharing or the replica count")
            group, gloo = dist.new_group(ranks), dist.new_group(ranks, backend="gloo")
            if t == topo.stage:
                replicas, replica_control = ReplicaGroup(group, topo.replica, n), gloo
    return replicas, replica_control


class StageWorker:
    """One worker: replica ``topo.replica`` of stage ``topo.stage``, its `StageLoop` plugged into the transport."""

    topo: Topology
    device: torch.device
    control: dist.ProcessGroup      # gloo, every rank: flow control, checkpoint barriers, the resume step
    devices: list[str]              # each rank's device identity
    stage: Stage
    loop: StageLoop

    def __init__(self, args: WorkerArgs):
        cfg = self.cfg = args.cfg
        self.run_dir = args.run_dir
        self.topo = topo = Topology(tuple(args.run.replicas), ray.train.get_context().get_world_rank())
        self.device = ray.train.torch.get_device()
        configure_torch(dataclasses.replace(cfg.run, threads=args.run.threads), self.device)  # as resolved
        see_run_dir(args.run_dir)
        # Flow control, checkpoint barriers and the resume step travel on gloo whatever carries activations.
        self.control = dist.new_group(backend="gloo")
        # Which ranks share a device decides each link's channel (fractional GPUs put stages on one GPU).
        self.devices = [""] * topo.world
        dist.all_gather_object(self.devices, device_identity(self.device, ray.util.get_node_ip_address()),
                               group=self.control)
        replicas, replica_control = replica_groups(topo, self.devices)
        self.stage = stage = Stage(cfg, topo.stage, self.device, replicas)
        checkpoints = CheckpointManager(args.run_dir, cfg.checkpoint.keep)
        checkpoints.freeze(frozen_weights(cfg))     # modules another run trained, if any: every checkpoint has them
        modules = [i for s in cfg.stage_modules() for i in s]
        partitions = zero_partitions(cfg.stage_modules(), cfg.stage_replicas()) if stage.zero_partitioned else None
        commit = GatheredCommit(checkpoints, modules, self.control, partitions)
        layout = MetricsLayout.of(cfg, stats=True)

        if topo.stage == 0:
            def stopping() -> bool:
                flag = torch.tensor([int(bool(ray.wait([args.stop], timeout=0)[0]))])
                if replicas is not None:
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=replica_control)
                return bool(flag)

            inputs = SourceInput(cfg.data, cfg.seed, cfg.run.steps, self.device, stopping, replicas)
        else:
            inputs = Gather([Receiver(p, layout.carried_width(topo.stage), self.device, self.control,
                                      self._channel(p)) for p in topo.upstream])
        output = Nowhere()
        if topo.downstream:
            output = Fanout([Sender(p, cfg.pipeline.in_flight, self.control, self._channel(p))
                             for p in topo.downstream])
        # Replica 0 speaks for its stage: MLflow run, metrics rows, console.
        speaks = topo.replica == 0
        tracking = StageLogger(args.stage_refs[topo.stage] if speaks else None)
        metrics = None
        if topo.is_last and speaks:  # it sees every stage's numbers for a step last: it logs rows
            metrics = MetricsLog(args.run_dir, cfg.run.steps)
        # The background evaluator (eval.every) reports to the worker that writes the metrics rows.
        monitor = functools.partial(args.monitor.start, "ray") if args.monitor else None
        self.tracking = tracking
        self.loop = StageLoop(cfg, stage, inputs=inputs, output=output, commit=commit, checkpoints=checkpoints,
                              layout=layout, metrics=metrics, tracking=tracking if tracking.ref else None,
                              console=speaks, monitor=monitor)

    def _channel(self, peer: int) -> str:
        return link_channel(self.devices[self.topo.rank], self.devices[peer])

    def _announce(self, start: int) -> dict:
        """``<run.dir>/workers/stage-<s>.json``: where each stage runs (pid, node: address, Ray node id, host
        name), for operators and tests. Several Ray nodes can share one address, so the node id tells them apart."""
        stage, replica = self.topo.stage, self.topo.replica
        info = {"stage": stage, "replica": replica, "modules": self.stage.module_ids, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "device": str(self.device), "threads": torch.get_num_threads(),
                "start": start,
                # rank -> channel of each link: "staged" through host memory between ranks sharing a GPU
                "links": {str(p): self._channel(p) for p in (*self.topo.upstream, *self.topo.downstream)}}
        name = f"stage-{stage}" + (f"-replica-{replica}" if replica else "")
        self.run_dir.write(self.run_dir.worker(name), json.dumps(info).encode())
        return info

    def run(self) -> None:
        try:
            where = self._announce(self.loop.restore(0))   # the step every rank agrees on
            self.tracking.set_tags({f"vgim.{k}": str(where[k]) for k in ("node", "node_id", "host", "device")})
            self.loop.run()
        finally:
            self.tracking.close()


def train_stage(args: WorkerArgs) -> None:
    """Ray Train's ``train_loop_per_worker`` (bound to ``args``). A fault no restart can fix (a full disk) is
    recorded with the driver's ``fault`` actor before the worker fails, and every worker of a restarted group
    then ends at once, so the run stops after one restart instead of redoing its steps
    ``pipeline.max_failures`` times."""
    if ray.get(args.fault.get.remote()):
        return
    try:
        StageWorker(args).run()
    except StorageFault as e:
        ray.get(args.fault.record.remote(str(e)))
        raise
