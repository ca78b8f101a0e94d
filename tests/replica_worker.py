"""One replica of stage 0 on a plain gloo group, for the replica tests:

    python tests/replica_worker.py RANK WORLD INIT_METHOD OUT STEPS RESUME_AT [KEY=VALUE ...]

Trains ``STEPS`` steps on its share of each noise batch (with ``RESUME_AT`` > 0: checkpoints at that step and
continues in a freshly built stage), then saves to ``OUT.<rank>`` the stage's state (rank 0), the last step's
metrics and its outputs of every step.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vgim_dist.config import load_config
from vgim_dist.data.source import NoiseSource
from vgim_dist.parallel.data_parallel import ReplicaGroup, split_sizes
from vgim_dist.parallel.deepspeed_engine import end_process
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.stage import Stage


def main(rank: int, world: int, init: str, out: str, steps: int, resume_at: int, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cfg = load_config("configs/smoke.yaml", overrides)
    group = ReplicaGroup(dist.group.WORLD, rank, world)
    stage = Stage(cfg, 0, replicas=group)
    source = NoiseSource(cfg.data, cfg.seed)
    outputs = []
    for step in range(steps):
        if resume_at and step == resume_at:   # checkpoint, then continue in a freshly built stage
            ckpt = CheckpointManager(out + ".ckpt")
            written = [None] * world
            dist.all_gather_object(written, ckpt.save_stage(stage, step))
            if rank == 0:
                files = {name: entry for w in written for name, entry in w.items()}
                partitions = {i: world for i in stage.module_ids} if stage.zero_partitioned else None
                ckpt.commit(step, stage.module_ids, files, partitions=partitions)
            dist.barrier()
            stage = Stage(cfg, 0, replicas=group)
            ckpt.load_stage(stage, step)
        x = source.batch(step)
        sizes = split_sizes(x.shape[0], world)
        start = sum(sizes[:rank])
        y, metrics = stage.train_step(x[start:start + sizes[rank]])
        outputs.append(y)
    state = {}
    if rank == 0:
        state = {k: v for pos in range(len(stage.module_ids)) for part in stage.module_state(pos)[:2]
                 for k, v in part.items()}
        state.update({f"metric.{k}": v.reshape(1) for k, v in metrics.items()})
    save_file({**state, "output": torch.cat(outputs).contiguous()}, f"{out}.{rank}")
    dist.destroy_process_group()
    end_process(0)   # DeepSpeed's gloo threads: no C++ static teardown (vgim does the same)


if __name__ == "__main__":
    a = sys.argv
    main(int(a[1]), int(a[2]), a[3], a[4], int(a[5]), int(a[6]), a[7:])
