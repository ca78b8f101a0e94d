"""The resolution phase on its own: threads, CPUs and GPUs per worker decided once from the config, the hardware
and the plan (vgim_dist/layout.py); one validator for every layout rule, whoever asks."""

from __future__ import annotations

import pytest

from vgim_dist.config import ConfigError, load_config
from vgim_dist.layout import Hardware, resolve_run
from vgim_dist.pipeline.topology import Topology

PIPELINE = ["run.runner=pipeline", "pipeline.stages=[[0], [1, 2, 3]]"]


def test_threads_come_from_the_config_then_the_plan_then_the_hardware():
    here = Hardware(cpus=8, gpus=0, default_threads=8)
    assert resolve_run(load_config("configs/smoke.yaml", ["run.threads=3"]), here, planned_threads=2).threads == 3
    assert resolve_run(load_config("configs/smoke.yaml"), here, planned_threads=2).threads == 2
    assert resolve_run(load_config("configs/smoke.yaml"), here).threads == 8             # the reference: torch's
    assert resolve_run(load_config("configs/smoke.yaml", PIPELINE), None).threads == 1   # a worker's one CPU
    whole = load_config("configs/smoke.yaml", [*PIPELINE, "pipeline.cpus_per_stage=2.5"])
    assert resolve_run(whole, None).threads == 2                                       # its whole CPUs


def test_a_pipeline_is_placed_on_the_cluster_it_joins():
    cfg = load_config("configs/smoke.yaml", [*PIPELINE, "run.device=auto"])
    run = resolve_run(cfg, None)
    assert (run.stages, run.replicas, run.workers, run.device) == ([[0], [1, 2, 3]], [1, 1], 2, "auto")
    on_cpus = run.placed(Hardware(cpus=1, gpus=0))
    assert on_cpus.device == "cpu" and on_cpus.resources() == {"CPU": 0.5}
    on_gpus = run.placed(Hardware(cpus=16, gpus=2))
    assert on_gpus.device == "cuda" and on_gpus.resources() == {"CPU": 1.0, "GPU": 1.0}
    assert run.threads == on_gpus.threads       # placing decides resources, never the numbers
    with pytest.raises(RuntimeError, match="set pipeline.gpus_per_stage to at most 0.5"):
        run.placed(Hardware(cpus=16, gpus=1))


def test_one_validator_for_the_neighbour_rule():
    with pytest.raises(ConfigError, match="neighbours need equal counts") as from_config:
        load_config("configs/smoke.yaml", [*PIPELINE[:1], "pipeline.stages=[[0], [1], [2, 3]]",
                                           "pipeline.replicas=[2, 3, 1]"])
    with pytest.raises(ValueError, match="neighbours need equal counts") as from_topology:
        Topology((2, 3, 1), 0)
    assert str(from_config.value) == str(from_topology.value)
