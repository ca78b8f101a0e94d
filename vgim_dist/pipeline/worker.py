"""The training loop of one pipeline stage, run by each Ray Train worker (world rank = stage index).

Stage 0 reads batches itself; every other stage trains on what its producer streams to it. Each stage takes
exactly the reference runner's steps on exactly the reference runner's inputs, so a CPU run ends bitwise
equal to it. Every ``checkpoint.every`` steps all stages save the same step; rank 0 commits once all have
written and reports it to Ray Train. A group that Ray Train restarts after a failure resumes, every rank
alike, from the newest intact committed checkpoint. Ray Train itself is told nothing of checkpoints: run.dir
is the only record of them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vgim_dist.config import Config
from vgim_dist.data.source import build_source
from vgim_dist.parallel.data_parallel import ReplicaGroup, split_sizes
from vgim_dist.pipeline.topology import Topology
from vgim_dist.pipeline.transport import Receiver, Sender, device_identity, link_channel
from vgim_dist.storage import StorageFault, open_dir, write_bytes
from vgim_dist.tracking import StageLogger, StageRef
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.loop import LoopPolicy, Pace
from vgim_dist.train.metrics import MetricsLog, eta
from vgim_dist.train.stage import Stage, configure_torch, metric_names

STAGE_STATS = ("wait_input_frac", "wait_consumer_frac", "step_time_s", "in_flight")


def see_run_dir(cfg: Config) -> None:
    """Fail at once, naming run.dir, when this worker cannot see the run directory the driver prepared:
    otherwise its checkpoints would go where the driver never looks. No restart can fix that."""
    fs, root = open_dir(cfg.run.dir, cfg.data.endpoint_url)
    if not fs.exists(f"{root}/config.yaml"):
        raise StorageFault(f"run.dir {cfg.run.dir}: not visible from this worker (node "
                           f"{ray.util.get_node_ip_address()}, no config.yaml there); on a cluster of several nodes "
                           "run.dir must be storage every node shares, e.g. s3://bucket/runs/name")


def forwarded_names(cfg: Config, stage: int) -> list[str]:
    """The metrics stage ``stage`` appends to the vector it forwards: its `Stage`'s loss terms, then its stats."""
    return metric_names(cfg.model, cfg.stage_modules()[stage]) + [f"stage.{stage}.{k}" for k in STAGE_STATS]


class Batches:
    """Stage 0's input: the data source's batches, until ``run.steps`` or until the driver asks to stop. A
    replica of stage 0 keeps its share of each batch's rows, and all replicas stop at the same step."""

    def __init__(self, cfg: Config, start: int, stop: ray.ObjectRef, device: torch.device,
                 replicas: ReplicaGroup | None, replica_control: dist.ProcessGroup | None):
        self.cfg, self.start, self.stop = cfg, start, stop
        self.replicas, self.replica_control = replicas, replica_control
        self.none = torch.empty(0, dtype=torch.float64, device=device)
        self.wait_s = 0.0       # reading data: stage 0's wait for input

    def stopping(self) -> bool:
        flag = torch.tensor([int(bool(ray.wait([self.stop], timeout=0)[0]))])
        if self.replicas is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.replica_control)
        return bool(flag)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = build_source(self.cfg.data, self.cfg.seed)
        try:
            for step in range(self.start, self.cfg.run.steps):
                # Only stage 0 decides to stop; the others stop where its stream ends, so all stop together.
                if self.stopping():
                    return
                t0 = time.perf_counter()
                x = source.batch(step)
                if self.replicas is not None:
                    sizes = split_sizes(x.shape[0], self.replicas.world)
                    x = x[sum(sizes[:self.replicas.rank]):][:sizes[self.replicas.rank]]
                self.wait_s += time.perf_counter() - t0
                yield x, self.none
        finally:
            source.close()


class Fanout:
    """To the next stage: all rows to one worker, or each of its N replicas its share in batch order."""

    def __init__(self, senders: list[Sender]):
        self.senders = senders

    def send(self, x: torch.Tensor, metrics: torch.Tensor) -> None:
        parts = x.split(split_sizes(x.shape[0], len(self.senders))) if len(self.senders) > 1 else [x]
        for sender, part in zip(self.senders, parts):
            sender.send(part, metrics)

    def close(self) -> None:
        for sender in self.senders:
            sender.close()

    @property
    def wait_s(self) -> float:
        return sum(s.wait_s for s in self.senders)

    @property
    def depth_sum(self) -> int:
        return max(s.depth_sum for s in self.senders)


class Gather:
    """From the previous stage: one worker's rows, or its N replicas' shares concatenated in batch order."""

    def __init__(self, receivers: list[Receiver]):
        self.receivers = receivers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        streams = [iter(r) for r in self.receivers]
        while True:
            items = [next(stream, None) for stream in streams]   # read every stream, its end included
            if any(item is None for item in items):
                assert all(item is None for item in items), "replica streams ended at different steps"
                return
            # Replicas all-reduce their loss terms, so any one's metrics vector stands for the stage.
            yield torch.cat([x for x, _ in items]) if len(items) > 1 else items[0][0], items[0][1]

    @property
    def wait_s(self) -> float:
        return sum(r.wait_s for r in self.receivers)


class Waits:
    """Where a stage's time went since the last logged step: waiting for input, for its consumer."""

    def __init__(self, inputs: Batches | Gather, output: Fanout | None):
        self.inputs, self.output = inputs, output
        self.start = self._counters()

    def _counters(self) -> tuple[float, float, int]:
        out = self.output
        return self.inputs.wait_s, out.wait_s if out else 0.0, out.depth_sum if out else 0

    def take(self, pace: Pace) -> list[float]:
        """The values of STAGE_STATS over ``pace``'s window; starts the next one."""
        now = self._counters()
        wait_in, wait_out, depth = (n - then for n, then in zip(now, self.start))
        self.start = now
        return [wait_in / pace.elapsed_s, wait_out / pace.elapsed_s, pace.step_time_s, depth / pace.steps]


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
    """One worker: replica ``topo.replica`` of stage ``topo.stage``."""

    def __init__(self, cfg: Config, stop: ray.ObjectRef, stage_refs: list[StageRef | None], monitor=None):
        self.cfg, self.monitor = cfg, monitor
        self.topo = topo = Topology(tuple(cfg.stage_replicas()), ray.train.get_context().get_world_rank())
        self.device = ray.train.torch.get_device()
        configure_torch(cfg.run, self.device)
        see_run_dir(cfg)
        # Flow control, checkpoint barriers and the resume step travel on gloo whatever carries activations.
        self.control = dist.new_group(backend="gloo")
        # Which ranks share a device decides each link's channel (fractional GPUs put stages on one GPU).
        self.devices: list[str] = [""] * topo.world
        dist.all_gather_object(self.devices, device_identity(self.device, ray.util.get_node_ip_address()),
                               group=self.control)
        self.replicas, replica_control = replica_groups(topo, self.devices)
        self.stage = Stage(cfg, topo.stage, self.device, self.replicas)
        self.checkpoints = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.data.endpoint_url)
        self.start = self._restore()
        where = self._announce()

        if topo.stage == 0:
            self.inputs = Batches(cfg, self.start, stop, self.device, self.replicas, replica_control)
        else:
            upstream = sum(len(forwarded_names(cfg, t)) for t in range(topo.stage))
            self.inputs = Gather([Receiver(p, upstream, self.device, self.control, self._channel(p))
                                  for p in topo.upstream])
        self.output = None
        if topo.downstream:
            self.output = Fanout([Sender(p, cfg.pipeline.in_flight, self.control, self._channel(p))
                                  for p in topo.downstream])
        self.own = forwarded_names(cfg, topo.stage)
        # Replica 0 speaks for its stage: MLflow run, metrics rows.
        self.tracking = StageLogger(stage_refs[topo.stage] if topo.replica == 0 else None)
        self.tracking.set_tags({f"vgim.{k}": str(where[k]) for k in ("node", "node_id", "host", "device")})
        self.metrics = None
        if topo.is_last and topo.replica == 0:  # it sees every stage's numbers for a step last: it logs rows
            self.names = [n for t in range(topo.stages) for n in forwarded_names(cfg, t)]
            self.metrics = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.data.endpoint_url)
            self.metrics.resume(self.start)

    def _channel(self, peer: int) -> str:
        return link_channel(self.devices[self.topo.rank], self.devices[peer])

    def _restore(self) -> int:
        """Load the newest intact committed checkpoint, as rank 0 sees it, so that every rank starts from the
        same step: the driver's resume step on a first attempt, the last commit on a restart after a failure
        (or the one before it, when a file of the last is damaged)."""
        step = torch.tensor([(self.checkpoints.newest_intact() or 0) if self.topo.rank == 0 else 0])
        dist.broadcast(step, src=0, group=self.control)
        start = int(step)
        if start:
            self.checkpoints.load_stage(self.stage, start)
        return start

    def _announce(self) -> dict:
        """``<run.dir>/workers/stage-<s>.json``: where each stage runs (pid, node: address, Ray node id, host
        name), for operators and tests. Several Ray nodes can share one address, so the node id tells them apart."""
        fs, root = open_dir(self.cfg.run.dir, self.cfg.data.endpoint_url)
        stage, replica = self.topo.stage, self.topo.replica
        info = {"stage": stage, "replica": replica, "modules": self.stage.module_ids, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "host": socket.gethostname(), "device": str(self.device), "threads": torch.get_num_threads(),
                "start": self.start}
        name = f"stage-{stage}" + (f"-replica-{replica}" if replica else "")
        write_bytes(fs, f"{root}/workers/{name}.json", json.dumps(info).encode())
        return info

    def run(self) -> None:
        # The background evaluator (eval.every) reports to the worker that writes the metrics rows.
        monitor = self.monitor.start("ray", self.metrics) if self.monitor and self.metrics else None
        policy = LoopPolicy(self.cfg, self.start, self._checkpoint, monitor)
        waits = Waits(self.inputs, self.output)
        unlogged = torch.zeros(len(STAGE_STATS), dtype=torch.float64, device=self.device)
        step = self.start
        clock = (time.monotonic(), self.start)     # elapsed and ETA of this stage's progress line
        try:
            for x, upstream in self.inputs:
                x, losses = self.stage.train_step(x)
                step = self.stage.step
                policy.tick()
                pace = policy.pace() if policy.should_log(step) else None
                # A host-to-device copy waits for the GPU: only on logged steps.
                stats = torch.tensor(waits.take(pace), dtype=torch.float64, device=self.device) if pace else unlogged
                mine = torch.cat([torch.stack([losses[n] for n in self.stage.metric_names]).double(), stats])
                vector = torch.cat([upstream, mine])
                if self.output:
                    self.output.send(x, vector)
                elif pace and self.metrics:  # the last stage's pace is the pipeline's
                    self.metrics.record(step, {**dict(zip(self.names, vector.tolist())), **pace.metrics()},
                                        prefix=f"stage {self.stage.index} " if self.stage.index else "")
                if pace and self.output and (self.stage.replicas is None or self.stage.replicas.rank == 0):
                    # Each stage's own pace (it may run up to pipeline.in_flight steps ahead of the next).
                    print(f"stage {self.stage.index} step {step}/{self.cfg.run.steps} | "
                          f"{eta(time.monotonic(), step, clock, self.cfg.run.steps)}", file=sys.stderr, flush=True)
                if pace and self.tracking.ref:  # the stage's own pace, as the reference logs the job's
                    self.tracking.log(step, {**dict(zip(self.own, mine.tolist())), **pace.metrics()})
                policy.checkpoint(step)
            if self.output:  # the consumer leaves its loop, and so reaches the final checkpoint's barrier
                self.output.close()
            policy.checkpoint(step, last_step=True)
        finally:
            self.tracking.close()

    def _checkpoint(self, step: int) -> None:
        written = self.checkpoints.save_stage(self.stage, step)
        if self.metrics:
            self.metrics.flush()
        every = [None] * dist.get_world_size(self.control)
        dist.all_gather_object(every, written, group=self.control)    # every stage has written `step`
        if self.topo.rank != 0:
            return
        modules = [i for s in self.cfg.stage_modules() for i in s]
        partitions = None
        if self.stage.zero_partitioned:  # ZeRO: every replica of every stage wrote its partition
            partitions = {i: n for mods, n in zip(self.cfg.stage_modules(), self.cfg.stage_replicas()) for i in mods}
        files = {name: entry for w in every for name, entry in w.items()}
        self.checkpoints.commit(step, modules, files, partitions=partitions)


def train_stage(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``. A fault no restart can fix (a full disk) is recorded with the
    driver's ``fault`` actor before the worker fails, and every worker of a restarted group then ends at once,
    so the run stops after one restart instead of redoing its steps ``pipeline.max_failures`` times."""
    fault = config["fault"]
    if ray.get(fault.get.remote()):
        return
    try:
        StageWorker(config["cfg"], config["stop"], config["stage_refs"], config.get("monitor")).run()
    except StorageFault as e:
        ray.get(fault.record.remote(str(e)))
        raise
