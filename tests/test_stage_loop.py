"""The stage loop's plugged parts on their own, without Ray: inputs (the data loader, the previous stage in the
same process), outputs (the next stage in the same process, nowhere), commits (local, gathered), the named
layout of the forwarded metrics vector, and two loops chained in one process as the reference runner does."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vgim_dist.config import load_config
from vgim_dist.data.source import NoiseSource
from vgim_dist.parallel.data_parallel import ReplicaGroup
from vgim_dist.train.loop import STAGE_STATS, MetricsLayout, StageLoop
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.parts import GatheredCommit, Handoff, LocalCommit, Nowhere, SourceInput, zero_partitions

from helpers import FAST


def smoke(*extra):
    return load_config("configs/smoke.yaml", [*FAST, *extra])


class FakeStage:
    """A stage that adds its index + 1 to its input, records each call in ``calls``, and reports one loss."""

    def __init__(self, index: int, calls: list):
        self.index, self.calls, self.step = index, calls, 0
        self.device = torch.device("cpu")
        self.module_ids = [index]
        self.metric_names = [f"module.{index}.nce"]

    def train_step(self, x):
        self.step += 1
        self.calls.append((self.index, self.step))
        return x + self.index + 1, {f"module.{self.index}.nce": torch.tensor(float(self.step))}


class FakeCheckpoints:
    """Saves and commits in memory: what was saved, committed and loaded, in order."""

    def __init__(self, newest: int | None = None):
        self.events, self.newest = [], newest

    def save_stage(self, stage, step):
        self.events.append(("save", stage.index, step))
        return {f"module-{stage.index}.safetensors": {"bytes": step}}

    def commit(self, step, modules, files, partitions=None):
        self.events.append(("commit", step, sorted(files), partitions))

    def load_stage(self, stage, step):
        stage.step = step
        self.events.append(("load", stage.index, step))

    def newest_intact(self):
        return self.newest


def test_layout_names_each_stage_part_of_the_forwarded_vector():
    cfg = smoke()       # stages [[0], [1, 2, 3]]
    plain, timed = MetricsLayout.of(cfg, stats=False), MetricsLayout.of(cfg, stats=True)
    assert plain.own(0) == ["module.0.nce", "module.0.kl", "module.0.loss"]
    assert timed.own(0) == plain.own(0) + [f"stage.0.{k}" for k in STAGE_STATS]
    assert timed.carried_width(0) == 0 and timed.carried_width(1) == len(timed.own(0))
    assert timed.names == timed.own(0) + timed.own(1)


def test_source_input_reads_from_start_until_stopped():
    cfg = smoke("run.steps=5")
    expected = NoiseSource(cfg.data, cfg.seed)
    got = list(SourceInput(cfg.data, cfg.seed, 5, torch.device("cpu")).items(2))
    assert len(got) == 3 and all(carried.numel() == 0 for _, carried in got)
    assert torch.equal(got[0][0], expected.batch(2)) and torch.equal(got[-1][0], expected.batch(4))
    asked = []
    stop_after_two = SourceInput(cfg.data, cfg.seed, 5, torch.device("cpu"),
                                 stopping=lambda: asked.append(1) or len(asked) > 2)
    assert len(list(stop_after_two.items(0))) == 2


def test_source_input_gives_a_replica_its_share_of_the_rows():
    cfg = smoke("data.batch_size=5")
    whole = NoiseSource(cfg.data, cfg.seed).batch(0)
    shares = [next(SourceInput(cfg.data, cfg.seed, 1, torch.device("cpu"),
                               replicas=ReplicaGroup(None, r, 2)).items(0))[0] for r in range(2)]
    assert [s.shape[0] for s in shares] == [3, 2] and torch.equal(torch.cat(shares), whole)


def test_local_commit_waits_for_every_stage_of_the_process():
    ckpt = FakeCheckpoints()
    commit = LocalCommit(ckpt, [0, 1], parts=2, partitions={0: 1, 1: 1})
    assert commit.agree(7) == 7
    commit.commit(4, {"module-0.safetensors": {}})
    assert ckpt.events == []
    commit.commit(4, {"module-1.safetensors": {}})
    assert ckpt.events == [("commit", 4, ["module-0.safetensors", "module-1.safetensors"], {0: 1, 1: 1})]


def test_gathered_commit_on_a_one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ckpt = FakeCheckpoints(newest=6)
        commit = GatheredCommit(ckpt, [0], dist.group.WORLD)
        assert commit.agree(0) == 6         # rank 0's newest intact checkpoint, whatever this rank proposes
        commit.commit(6, {"module-0.safetensors": {}})
        assert ckpt.events == [("commit", 6, ["module-0.safetensors"], None)]
    finally:
        dist.destroy_process_group()


def test_zero_partitions_count_the_replicas_of_each_module():
    assert zero_partitions([[0], [1, 2]], [2, 1]) == {0: 2, 1: 1, 2: 1}


def test_nowhere_takes_anything():
    out = Nowhere()
    out.send(torch.ones(1), torch.ones(1))
    out.close()
    assert out.wait_s == 0 and out.depth_sum == 0


def chain(cfg, ckpt, calls, tmp_path, start=0):
    """Two loops in one process, as the reference runner arranges them: source -> stage 0 -> stage 1."""
    stages = [FakeStage(0, calls), FakeStage(1, calls)]
    commit = LocalCommit(ckpt, [0, 1], parts=2)
    layout = MetricsLayout((("module.0.nce",), ("module.1.nce",)), stats=False)
    metrics = MetricsLog(str(tmp_path), cfg.run.steps)
    handoff = Handoff()
    first = StageLoop(cfg, stages[0], inputs=SourceInput(cfg.data, cfg.seed, cfg.run.steps, torch.device("cpu")),
                      output=handoff, commit=commit, checkpoints=ckpt, layout=layout)
    handoff.producer = first
    last = StageLoop(cfg, stages[1], inputs=handoff, output=Nowhere(), commit=commit, checkpoints=ckpt,
                     layout=layout, metrics=metrics)
    for loop in (first, last):
        loop.restore(start)
    return last, metrics


def test_two_loops_in_one_process_take_turns_and_commit_each_checkpoint_once(tmp_path):
    cfg = smoke("run.steps=4", "checkpoint.every=2", "run.log_every=2")
    ckpt, calls = FakeCheckpoints(), []
    last, metrics = chain(cfg, ckpt, calls, tmp_path)
    assert last.run() == 4
    assert calls == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3), (0, 4), (1, 4)]
    files = ["module-0.safetensors", "module-1.safetensors"]
    assert ckpt.events == [("save", 0, 2), ("save", 1, 2), ("commit", 2, files, None),
                           ("save", 0, 4), ("save", 1, 4), ("commit", 4, files, None)]
    assert [(r["step"], r["module.0.nce"], r["module.1.nce"]) for r in metrics.rows] == [(2, 2.0, 2.0), (4, 4.0, 4.0)]


def test_a_resumed_chain_loads_every_stage_and_saves_the_end_once(tmp_path):
    cfg = smoke("run.steps=3", "checkpoint.every=0")
    ckpt, calls = FakeCheckpoints(), []
    last, _ = chain(cfg, ckpt, calls, tmp_path, start=2)
    assert last.run() == 3 and calls == [(0, 3), (1, 3)]
    assert ckpt.events[:2] == [("load", 0, 2), ("load", 1, 2)]
    assert ckpt.events[2:] == [("save", 0, 3), ("save", 1, 3),
                               ("commit", 3, ["module-0.safetensors", "module-1.safetensors"], None)]
