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
from vgim_dist.model import loss_terms
from vgim_dist.parallel.data_parallel import ReplicaGroup, split_sizes
from vgim_dist.pipeline.transport import Receiver, Sender, device_identity, link_channel
from vgim_dist.storage import StorageFault, open_dir, write_bytes
from vgim_dist.tracking import StageLogger, StageRef
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.metrics import MetricsLog, eta
from vgim_dist.train.stage import Stage

STAGE_STATS = ("wait_input_frac", "wait_consumer_frac", "step_time_s", "in_flight")


def metric_names(cfg: Config, stage: int) -> list[str]:
    """The metrics stage ``stage`` appends to the vector it forwards: its modules' losses, then its stats."""
    losses = [f"module.{i}.{k}" for i in cfg.stage_modules()[stage] for k in loss_terms(cfg.model, i)]
    return losses + [f"stage.{stage}.{k}" for k in STAGE_STATS]


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


class Window:
    """Where a stage's time went since the last logged step."""

    def __init__(self, inputs: Batches | Gather, output: Fanout | None):
        self.inputs, self.output = inputs, output
        self.reset()

    def _counters(self) -> tuple[float, float, int]:
        out = self.output
        return self.inputs.wait_s, out.wait_s if out else 0.0, out.depth_sum if out else 0

    def reset(self) -> None:
        self.t0, self.steps, self.start = time.perf_counter(), 0, self._counters()

    def take(self) -> list[float]:
        """The values of STAGE_STATS over the window; starts the next one."""
        elapsed = time.perf_counter() - self.t0
        wait_in, wait_out, depth = (now - then for now, then in zip(self._counters(), self.start))
        stats = [wait_in / elapsed, wait_out / elapsed, elapsed / self.steps, depth / self.steps]
        self.reset()
        return stats


class StageWorker:
    """One worker: replica ``replica`` of stage ``stage``. World ranks run stage by stage, replicas adjacent."""

    def __init__(self, cfg: Config, stop: ray.ObjectRef, stage_refs: list[StageRef | None]):
        ctx = ray.train.get_context()
        self.cfg, self.rank = cfg, ctx.get_world_rank()
        reps = cfg.stage_replicas()
        first = [sum(reps[:s]) for s in range(len(reps))]            # world rank of each stage's replica 0
        self.stage_index = max(s for s in range(len(reps)) if first[s] <= self.rank)
        self.replica, self.last = self.rank - first[self.stage_index], len(reps) - 1
        s = self.stage_index
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = ray.train.torch.get_device()
        # Flow control, checkpoint barriers and the resume step travel on gloo whatever carries activations.
        self.control = dist.new_group(backend="gloo")
        # Which ranks share a device decides each link's channel (fractional GPUs put stages on one GPU).
        self.devices: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(self.devices, device_identity(self.device, ray.util.get_node_ip_address()),
                               group=self.control)
        # Every rank takes part in creating every group, in the same order; each keeps its own stage's.
        self.replicas, replica_control = None, None
        for t, n in enumerate(reps):
            if n > 1:
                ranks = list(range(first[t], first[t] + n))
                shared = {self.devices[r] for r in ranks}
                if len(shared) < n and any(d.startswith("cuda") for d in shared):
                    raise RuntimeError(f"pipeline.replicas: the {n} replicas of stage {t} share GPUs ({sorted(shared)}); "
                                       "replicas need a device each (NCCL rejects two ranks on one device): lower "
                                       "pipeline.gpus_per_stage's sharing or the replica count")
                group, gloo = dist.new_group(ranks), dist.new_group(ranks, backend="gloo")
                if t == s:
                    self.replicas, replica_control = ReplicaGroup(group, self.replica, n), gloo
        self.stage = Stage(cfg, s, self.device, self.replicas)
        self.checkpoints = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.data.endpoint_url)
        self.start = self._restore()
        self._announce()

        upstream = sum(len(metric_names(cfg, t)) for t in range(s))
        if s == 0:
            self.inputs = Batches(cfg, self.start, stop, self.device, self.replicas, replica_control)
        else:
            peers = self._peers(first[s - 1], reps[s - 1], reps[s])
            self.inputs = Gather([Receiver(p, upstream, self.device, self.control, self._channel(p)) for p in peers])
        self.output = None
        if s < self.last:
            peers = self._peers(first[s + 1], reps[s + 1], reps[s])
            self.output = Fanout([Sender(p, cfg.pipeline.in_flight, self.control, self._channel(p)) for p in peers])
        self.own = metric_names(cfg, s)
        # Replica 0 speaks for its stage: MLflow run, metrics rows.
        self.tracking = StageLogger(stage_refs[s] if self.replica == 0 else None)
        self.metrics = None
        if s == self.last and self.replica == 0:  # it sees every stage's numbers for a step last: it logs rows
            self.names = [n for t in range(s + 1) for n in metric_names(cfg, t)]
            self.metrics = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.data.endpoint_url)
            self.metrics.resume(self.start)

    def _channel(self, peer: int) -> str:
        return link_channel(self.devices[self.rank], self.devices[peer])

    def _peers(self, neighbour_first: int, neighbour_replicas: int, own_replicas: int) -> list[int]:
        """World ranks of the neighbour stage this worker exchanges with: its replica twin when both sides have
        equal counts, else every replica of the replicated side (the other side has one worker)."""
        if neighbour_replicas == own_replicas:
            return [neighbour_first + self.replica]
        return list(range(neighbour_first, neighbour_first + neighbour_replicas))

    def _restore(self) -> int:
        """Load the newest intact committed checkpoint, as rank 0 sees it, so that every rank starts from the
        same step: the driver's resume step on a first attempt, the last commit on a restart after a failure
        (or the one before it, when a file of the last is damaged)."""
        step = torch.tensor([(self.checkpoints.newest_intact() or 0) if self.rank == 0 else 0])
        dist.broadcast(step, src=0, group=self.control)
        start = int(step)
        if start:
            self.checkpoints.load_stage(self.stage, start)
        return start

    def _announce(self) -> None:
        """``<run.dir>/workers/stage-<s>.json``: where each stage runs (pid, node), for operators and tests."""
        fs, root = open_dir(self.cfg.run.dir, self.cfg.data.endpoint_url)
        info = {"stage": self.stage_index, "replica": self.replica, "modules": self.stage.module_ids,
                "pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": str(self.device),
                "start": self.start}
        name = f"stage-{self.stage_index}" + (f"-replica-{self.replica}" if self.replica else "")
        write_bytes(fs, f"{root}/workers/{name}.json", json.dumps(info).encode())

    def run(self) -> None:
        cfg, every = self.cfg, self.cfg.checkpoint.every
        step = last_saved = self.start
        window = Window(self.inputs, self.output)
        self.clock = (time.monotonic(), self.start)
        unlogged = torch.zeros(len(STAGE_STATS), dtype=torch.float64, device=self.device)
        for x, upstream in self.inputs:
            x, losses = self.stage.train_step(x)
            step = self.stage.step
            window.steps += 1
            logged = step % cfg.run.log_every == 0 or step == cfg.run.steps
            # A host-to-device copy waits for the GPU: only on logged steps.
            stats = torch.tensor(window.take(), dtype=torch.float64, device=self.device) if logged else unlogged
            mine = torch.cat([torch.stack([losses[n] for n in self.own[:-len(STAGE_STATS)]]).double(), stats])
            vector = torch.cat([upstream, mine])
            if self.output:
                self.output.send(x, vector)
            elif logged and self.metrics:
                self._log(step, vector)
            if logged and self.replica == 0 and self.stage_index != self.last:
                # Each stage's own pace (it may run up to pipeline.in_flight steps ahead of the next one).
                print(f"stage {self.stage_index} step {step}/{cfg.run.steps} | "
                      f"{eta(time.monotonic(), step, self.clock, cfg.run.steps)}", file=sys.stderr, flush=True)
            if logged and self.tracking.ref:
                self.tracking.log(step, dict(zip(self.own, mine.tolist())))
            if every and step % every == 0:
                self._checkpoint(step)
                last_saved = step
        if self.output:
            self.output.close()
        if step != last_saved or step == 0:
            self._checkpoint(step)
        self.tracking.close()

    def _log(self, step: int, vector: torch.Tensor) -> None:
        row = dict(zip(self.names, vector.tolist()))
        step_time = row[f"stage.{self.stage_index}.step_time_s"]  # the pipeline's pace is the last stage's
        row["windows_per_s"] = self.cfg.data.batch_size / step_time
        row["step_time_s"] = step_time
        self.metrics.record(step, row, prefix=f"stage {self.stage_index} " if self.last else "")

    def _checkpoint(self, step: int) -> None:
        written = self.checkpoints.save_stage(self.stage, step)
        if self.metrics:
            self.metrics.flush()
        every = [None] * dist.get_world_size(self.control)
        dist.all_gather_object(every, written, group=self.control)    # every stage has written `step`
        if self.rank != 0:
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
        StageWorker(config["cfg"], config["stop"], config["stage_refs"]).run()
    except StorageFault as e:
        ray.get(fault.record.remote(str(e)))
        raise
