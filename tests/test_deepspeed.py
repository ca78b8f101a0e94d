"""stage.engine: deepspeed on CPU (gloo): the same trajectory as the torch engine, alone and as ZeRO 1/2
replicas, and checkpoints that resume exactly."""

import json

import pytest
import torch

from vgim_dist.config import load_config
from vgim_dist.launch import train

from helpers import (
    FAST,
    REPLICA_OVERRIDES,
    REPLICA_STEPS,
    ROOT,
    on,
    placements,
    replica_reference,
    run_cli,
    run_replicas,
)

pytestmark = pytest.mark.slow  # `make test` runs it, `make test-fast` skips it

pytest.importorskip("deepspeed")


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("placement", placements("cpu", "cuda"))
def test_deepspeed_zero0_follows_the_torch_engine(tmp_path, placement):
    overrides = [*FAST, "run.log_every=1", "run.steps=6", "optim.grad_clip=5.0", *on(placement)]
    train(load_config("configs/smoke.yaml", [*overrides, f"run.dir={tmp_path / 'torch'}"]))
    # DeepSpeed as a user runs it: `vgim train`, which ends with a hard exit (parallel/deepspeed_engine.py)
    ds = [*overrides, "stage.engine=deepspeed", f"run.dir={tmp_path / 'deepspeed'}"]
    sets = [a for o in ds for a in ("--set", o)]
    done = run_cli(*sets, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(rows(tmp_path / "torch"), rows(tmp_path / "deepspeed"), strict=True):
        for k in a:
            if k.startswith("module."):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_replicas_follow_one_unreplicated_torch_stage(tmp_path, zero):
    plain = [*REPLICA_OVERRIDES, "model.batch_norm=false"]
    got = run_replicas(tmp_path, 2, [*plain, "stage.engine=deepspeed", f"stage.zero={zero}"], REPLICA_STEPS)[0]
    state, metrics, _ = replica_reference(REPLICA_STEPS, plain)
    for k, v in state.items():
        if ".optim." in k:
            continue                      # ZeRO keeps the moments in per-replica partitions
        if k.endswith(".rng"):
            assert torch.equal(got[k], v), k
        else:
            assert (got[k] - v).abs().max() < 1e-4 * v.abs().max() + 1e-5, (k, (got[k] - v).abs().max())
    for k, v in metrics.items():
        assert got[f"metric.{k}"].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k


def test_zero_checkpoint_resumes_exactly(tmp_path):
    overrides = [*REPLICA_OVERRIDES, "model.batch_norm=false", "stage.engine=deepspeed", "stage.zero=1"]
    straight = run_replicas(tmp_path / "a", 2, overrides, 6)
    resumed = run_replicas(tmp_path / "b", 2, overrides, 6, resume_at=3)
    assert (tmp_path / "b" / "state.ckpt" / "checkpoints" / "step-3" / "module-0.zero-1.safetensors").exists()
    for k, v in straight[0].items():
        assert torch.equal(resumed[0][k], v), k


def test_the_one_time_op_build_is_announced(tmp_path, monkeypatch, capsys):
    from vgim_dist.parallel.deepspeed_engine import announce_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert announce_op_build()
    assert capsys.readouterr().err.startswith("compiling DeepSpeed ops (once")
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert not announce_op_build() and capsys.readouterr().err == ""
