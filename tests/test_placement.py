"""Several stages on one GPU: which channel each link takes, what each worker asks Ray for, and Ray placing
fractional requests of several workers on one device (a local Ray cluster whose "GPU" is a custom resource:
nothing here needs CUDA)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from vgim_dist.config import load_config
from vgim_dist.pipeline.runner import placement
from vgim_dist.pipeline.transport import DEFAULT, STAGED, device_identity, link_channel


def test_link_channel_stages_through_the_host_only_on_a_shared_gpu():
    gpu0, gpu1 = "cuda GPU-aaaa on 10.0.0.1", "cuda GPU-bbbb on 10.0.0.1"
    assert link_channel(gpu0, gpu0) == STAGED           # NCCL rejects two ranks on one device
    assert link_channel(gpu0, gpu1) == DEFAULT          # NCCL between distinct GPUs
    assert link_channel("cpu on 10.0.0.1", "cpu on 10.0.0.1") == DEFAULT   # gloo, the default group on CPU
    assert link_channel("cpu on 10.0.0.1", "cpu on 10.0.0.2") == DEFAULT
    assert device_identity(torch.device("cpu"), "127.0.0.1") == "cpu on 127.0.0.1"


def test_placement_asks_for_a_share_of_a_gpu():
    two = ["run.runner=pipeline", "pipeline.stages=[[0], [1, 2, 3]]"]
    cfg = load_config("configs/smoke.yaml", [*two, "run.device=cuda", "pipeline.gpus_per_stage=0.5"])
    assert placement(cfg, {"CPU": 16, "GPU": 1}) == (True, {"CPU": 1.0, "GPU": 0.5})
    whole = load_config("configs/smoke.yaml", [*two, "run.device=cuda"])
    assert placement(whole, {"CPU": 16, "GPU": 2}) == (True, {"CPU": 1.0, "GPU": 1.0})
    with pytest.raises(RuntimeError, match="gpus_per_stage to at most 0.5"):
        placement(whole, {"CPU": 16, "GPU": 1})             # instead of waiting forever for a second GPU
    with pytest.raises(RuntimeError, match="no GPU"):
        placement(whole, {"CPU": 16})
    cpu = load_config("configs/smoke.yaml", [*two, "run.device=auto"])
    assert placement(cpu, {"CPU": 2}) == (False, {"CPU": 1.0})
    assert placement(cpu, {"CPU": 1}) == (False, {"CPU": 0.5})


def _where(config: dict) -> None:
    """Each worker writes what Ray gave it; the barrier proves that all of them run at the same time."""
    ctx = ray.get_runtime_context()
    dist.barrier()
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"{rank}.json").write_text(json.dumps(
        {"node": ctx.get_node_id(), "fake_gpu": ctx.get_assigned_resources().get("fake_gpu", 0.0)}))


@pytest.mark.timeout(300)
def test_fractional_workers_share_one_device(tmp_path):
    """A one-"GPU" node runs a pipeline of 3 stage workers at once when each asks for a third of it."""
    stages = 3
    cfg = load_config("configs/smoke.yaml", ["run.runner=pipeline", "pipeline.stages=[[0], [1, 2], [3]]",
                                             "run.device=cuda", "pipeline.gpus_per_stage=0.333"])
    use_gpu, resources = placement(cfg, {"CPU": 2, "GPU": 1})
    assert use_gpu
    # The same request under a custom name: Ray schedules it as it schedules GPUs, without CUDA here.
    resources = {"CPU": resources["CPU"] / stages, "fake_gpu": resources["GPU"]}
    ray.init(num_cpus=2, resources={"fake_gpu": 1}, _node_ip_address="127.0.0.1", include_dashboard=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests/
    try:
        result = TorchTrainer(_where, train_loop_config={"out": str(tmp_path)},
                              scaling_config=ScalingConfig(num_workers=stages, resources_per_worker=resources),
                              run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    finally:
        ray.shutdown()
    assert result.error is None
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(stages)]
    assert len({w["node"] for w in seen}) == 1
    assert all(w["fake_gpu"] == pytest.approx(1 / stages, abs=1e-3) for w in seen)
