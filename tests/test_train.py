"""The reference trainer: determinism, split independence, checkpoint/restore across processes, the start step
(fresh, resume, refuse), SIGINT that leaves a resumable checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgim_dist.config import RunConfig, load_config
from vgim_dist.errors import UserError
from vgim_dist.launch import train
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.stage import Stage, configure_torch

from helpers import FAST, assert_bitwise_equal, cfg_for, final_state, on, placements, run_cli


def test_same_seed_same_parameters(tmp_path):
    train(cfg_for(tmp_path / "a", "run.steps=6"))
    train(load_config(tmp_path / "a" / "config.yaml", [f"run.dir={tmp_path / 'b'}"]))   # as docs/training.md says
    assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    train(cfg_for(tmp_path / "c", "run.steps=6", "seed=1"))
    c = final_state(tmp_path / "c")
    assert not torch.equal(c["module.0.layers.0.0.weight"], final_state(tmp_path / "a")["module.0.layers.0.0.weight"])


def test_same_seed_same_parameters_at_two_threads(tmp_path):
    # Two threads split work (and so sums) differently from one: a run is reproducible at any fixed count.
    for name in ("a", "b"):
        summary = train(cfg_for(tmp_path / name, "run.steps=6", "run.threads=2"))
        assert summary["threads"] == 2 and load_config(tmp_path / name / "config.yaml").run.threads == 2
    assert_bitwise_equal(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_default_thread_count_is_recorded(tmp_path):
    summary = train(cfg_for(tmp_path, "run.steps=1", "run.threads=0"))
    recorded = load_config(tmp_path / "config.yaml").run.threads
    assert recorded >= 1 and summary["threads"] == recorded == torch.get_num_threads()


def test_deterministic_setting(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        configure_torch(RunConfig(threads=1, deterministic=False), torch.device("cuda"))
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        configure_torch(RunConfig(threads=1, deterministic=True), torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)


def test_stage_split_does_not_change_the_numbers(tmp_path):
    train(cfg_for(tmp_path / "one", "run.steps=5", "pipeline.stages=[]"))
    train(cfg_for(tmp_path / "four", "run.steps=5", "pipeline.stages=[[0],[1],[2],[3]]"))
    assert_bitwise_equal(final_state(tmp_path / "one"), final_state(tmp_path / "four"))


def test_checkpoint_keys_name_modules_and_load_without_pickle(tmp_path):
    train(cfg_for(tmp_path, "run.steps=4", "checkpoint.every=2"))
    ckpt = CheckpointManager(str(tmp_path))
    assert ckpt.steps() == [2, 4]
    d = Path(ckpt.step_dir(4))
    assert json.loads((d / "checkpoint.json").read_text())["modules"] == [0, 1, 2, 3]
    weights = load_file(d / "module-2.safetensors")
    assert weights and all(k.startswith("module.2.") for k in weights)
    train_state = load_file(d / "module-2.train.safetensors")
    assert "module.2.rng" in train_state and any(".optim." in k for k in train_state)
    assert (tmp_path / "config.yaml").exists() and load_config(tmp_path / "config.yaml").run.steps == 4


@pytest.mark.slow
def test_2n_steps_equal_n_then_restore_in_new_process_then_n(tmp_path):
    sets = [a for s in FAST for a in ("--set", s)]
    straight = run_cli(*sets, "--set", f"run.dir={tmp_path / 'straight'}", "--set", "run.steps=8")
    assert straight.returncode == 0, straight.stderr
    first = run_cli(*sets, "--set", f"run.dir={tmp_path / 'split'}", "--set", "run.steps=4")
    assert first.returncode == 0, first.stderr
    again = run_cli(*sets, "--set", f"run.dir={tmp_path / 'split'}", "--set", "run.steps=8")
    assert again.returncode != 0 and "pass --resume" in again.stderr
    second = run_cli(*sets, "--set", f"run.dir={tmp_path / 'split'}", "--set", "run.steps=8", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed from step 4" in second.stderr
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [2, 4, 6, 8]


def test_refused_run_leaves_the_existing_run_untouched(tmp_path):
    train(cfg_for(tmp_path, "run.steps=2"))
    before = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(cfg_for(tmp_path, "run.steps=4", "seed=7"))
    assert (tmp_path / "config.yaml").read_bytes() == before
    assert CheckpointManager(str(tmp_path)).steps() == [2]


def test_resume_of_a_run_dir_without_a_run_is_refused(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train(cfg_for(missing, "run.steps=2"), resume=True)
    assert not missing.exists()                                 # nothing written, nothing trained


@pytest.mark.slow
def test_sigint_leaves_a_resumable_checkpoint(tmp_path):
    sets = [a for s in FAST for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "vgim_dist", "train", "configs/smoke.yaml", *sets,
                             "--set", f"run.dir={tmp_path}", "--set", "run.steps=100000"],
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:    # a progress line: the loop, and its Ctrl-C handler, are running
        seen.append(line)
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    ckpt = CheckpointManager(str(tmp_path))
    step = ckpt.latest()
    assert step and step > 0
    state = final_state(tmp_path)
    resumed = run_cli(*sets, "--set", f"run.dir={tmp_path}", "--set", f"run.steps={step + 2}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert ckpt.latest() == step + 2
    assert not torch.equal(final_state(tmp_path)["module.0.layers.0.0.weight"], state["module.0.layers.0.0.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="run.device=cuda but no CUDA device"):
        train(cfg_for(tmp_path, "run.device=cuda", "run.steps=1"))


def test_too_short_crop_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"module 1 emits 9 frames for data.crop = 640 samples.*at least \d+"):
        train(cfg_for(tmp_path, "data.crop=640"))
    assert not tmp_path.joinpath("config.yaml").exists()       # refused before anything is written



@pytest.mark.parametrize("placement", placements("cpu", "cuda"))
def test_bf16_autocast_trains_close_to_fp32(placement):
    """bf16 autocast against fp32 on the same batch and weights: module 0's NCE loss within 5 % after one step
    (the stated tolerance: bf16 keeps 8 bits of mantissa, about 0.4 % per rounding)."""
    losses, outputs = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = cfg_for("unused", f"run.precision={precision}", *on(placement))
        stage = Stage(cfg, 0, torch.device(cfg.run.device))
        x = torch.randn(4, 1, 2560, generator=torch.Generator().manual_seed(0))
        outputs[precision], m = stage.train_step(x)
        losses[precision] = float(m["module.0.nce"])
    assert outputs["bf16"].dtype == torch.bfloat16            # half the bytes between stages
    assert outputs["bf16"].device == outputs["fp32"].device and outputs["fp32"].device.type == cfg.run.device
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.05, losses


def test_metrics_reach_the_file_at_every_logged_step_and_a_resume_drops_rows_past_its_checkpoint(tmp_path):
    import io

    from vgim_dist.train.metrics import MetricsLog

    def on_disk():
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    console = io.StringIO()
    log = MetricsLog(str(tmp_path), 8, stream=console)
    for step in (2, 4, 6):
        log.record(step, {"module.0.nce": 1.0})
        assert on_disk()[-1] == step                   # no checkpoint needed to see it
    assert "step 6/8" in console.getvalue() and "elapsed, ETA" in console.getvalue()
    with open(tmp_path / "metrics.jsonl", "a") as f:   # a crash in the middle of an append
        f.write('{"step": 8, "modu')
    again = MetricsLog(str(tmp_path), 8, stream=console)
    again.resume(4)                                    # the checkpoint restored is step 4
    again.record(6, {"module.0.nce": 2.0})
    assert on_disk() == [2, 4, 6]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["module.0.nce"] == 2.0
