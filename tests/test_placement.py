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

from vgim_dist.config import ConfigError, load_config
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


def test_worker_threads_never_exceed_the_cpus_ray_reserves():
    two = ["run.runner=pipeline", "pipeline.stages=[[0], [1, 2, 3]]"]

    def cpus(*overrides: str, cluster: float = 16) -> float:
        return placement(load_config("configs/smoke.yaml", [*two, *overrides]), {"CPU": cluster})[1]["CPU"]

    # Default reservation: run.threads CPUs each when more than one, else a share of at most one CPU.
    assert cpus("run.threads=2") == 2.0 and cpus("run.threads=3", cluster=6) == 3.0
    assert cpus("run.threads=1", cluster=1) == 0.5 and cpus(cluster=2) == 1.0
    with pytest.raises(ConfigError, match=r"2 workers x 2 threads need 4 CPUs, the Ray cluster has 2; "
                                          r"set run.threads to at most 1"):
        cpus("run.threads=2", cluster=2)
    # An explicit reservation: threads within it, or refused naming both numbers.
    assert cpus("pipeline.cpus_per_stage=2", "run.threads=2") == 2.0
    assert cpus("pipeline.cpus_per_stage=4") == 4.0 and cpus("pipeline.cpus_per_stage=0.5") == 0.5
    with pytest.raises(ConfigError, match=r"run.threads = 4 exceeds pipeline.cpus_per_stage = 2"):
        cpus("pipeline.cpus_per_stage=2", "run.threads=4")
    with pytest.raises(ConfigError, match=r"run.threads = 2 exceeds pipeline.cpus_per_stage = 0.5"):
        cpus("pipeline.cpus_per_stage=0.5", "run.threads=2")


def _where(config: dict) -> None:
    """Each worker writes what Ray gave it; the barrier proves that all of them run at the same time."""
    ctx = ray.get_runtime_context()
    dist.barrier()
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"{rank}.json").write_text(json.dumps(
        {"node": ctx.get_node_id(), "fake_gpu": ctx.get_assigned_resources().get("fake_gpu", 0.0)}))


@pytest.mark.slow
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


def _link(rank: int, port: int, channel: str, out: str) -> None:
    """Rank 0 streams five batches to rank 1 over ``channel``; rank 1 writes what it received."""
    from vgim_dist.pipeline.transport import Receiver, Sender

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    control = dist.new_group(backend="gloo")
    batches = [torch.randn(3, 4, 5 + i, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    batches[2] = batches[2].to(torch.bfloat16)
    if rank == 0:
        sender = Sender(1, in_flight=2, control=control, channel=channel)
        for i, x in enumerate(batches):
            sender.send(x, torch.full((3,), float(i), dtype=torch.float64))
            assert len(sender.outstanding) <= 2                     # the window bounds what is in flight
        sender.close()
    else:
        got = list(Receiver(0, 3, torch.device("cpu"), control, channel))
        torch.save(got, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("channel", [DEFAULT, STAGED])
def test_both_channels_deliver_every_batch_bitwise_in_order(tmp_path, channel):
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "received.pt")
    tmp.spawn(_link, args=(port, channel, out), nprocs=2, join=True)
    got = torch.load(out)
    expected = [torch.randn(3, 4, 5 + i, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    expected[2] = expected[2].to(torch.bfloat16)
    assert len(got) == 5
    for i, ((x, metrics), want) in enumerate(zip(got, expected)):
        assert x.dtype == want.dtype and torch.equal(x, want)
        assert torch.equal(metrics, torch.full((3,), float(i), dtype=torch.float64))
