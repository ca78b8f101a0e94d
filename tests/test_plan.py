"""The planner: layouts enumerated, priced and ranked from module profiles (synthetic ones with this machine's
measured shape, and a real one measured here), ``vgim plan`` on the command line, and ``auto`` at launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vgim_dist.config import ConfigError, load_config
from vgim_dist.model import describe
from vgim_dist.plan import CostModel, ModuleProfile, Profile, Timing, estimate, plan, rank, table
from vgim_dist.plan.planner import replica_counts, splits
from vgim_dist.plan.profile import cached_profile

BIN = Path(sys.executable).parent
GiB = 2**30


def vgim_on_two_cores() -> Profile:
    """`vgim` at 8 x 20,480 on this 2-core machine (benchmarks/step_time.py): seconds per module step at 1 and
    2 threads; half a batch takes a little over half the time."""
    one, two = [2.04, 0.61, 0.35, 0.19], [1.06, 0.34, 0.20, 0.10]
    out = [512 * 128 * 4, 512 * 32 * 4, 512 * 32 * 4, 256 * 32 * 4]        # bytes per row sent on
    params = [21_000_000, 4_200_000, 2_100_000, 3_000_000]
    mods = [ModuleProfile(i, [Timing(1, 8, one[i]), Timing(1, 4, one[i] * 0.52),
                              Timing(2, 8, two[i]), Timing(2, 4, two[i] * 0.55)], out[i], params[i], 600 * 2**20)
            for i in range(4)]
    return Profile("cpu", "test", 2, 24 * GiB, 8, 20480, "fp32", mods)


def balanced(cores: int = 4, device: str = "cpu", memory: int = 24 * GiB) -> Profile:
    """Four equal modules that scale poorly with threads: splitting them pays."""
    mods = [ModuleProfile(i, [Timing(1, 64, 1.0), Timing(1, 32, 0.5), Timing(cores, 64, 0.8),
                              Timing(cores, 32, 0.4)], 1_000_000, 4_000_000, GiB) for i in range(4)]
    return Profile(device, "test", cores, memory, 64, 20480, "bf16", mods)


def test_splits_and_replica_counts_enumerate_every_valid_layout():
    assert len(splits(4, 4)) == 8 and len(splits(4, 2)) == 4
    assert [[0], [1, 2, 3]] in splits(4, 2) and [[0, 1, 2, 3]] in splits(4, 1)
    counts = replica_counts(2, 3, batch=8)
    assert sorted(counts) == [[1, 1], [1, 2], [2, 1]]
    # neighbours: equal counts, or 1 on one side
    assert [2, 3] not in replica_counts(2, 5, 8) and [2, 2] in replica_counts(2, 5, 8)
    assert all(max(c) <= 2 for c in replica_counts(1, 9, batch=2))      # never an empty share


def test_timing_is_affine_in_rows_between_measurements():
    m = ModuleProfile(0, [Timing(1, 8, 2.0), Timing(1, 4, 1.2)], 0, 0, 0)
    assert m.seconds(1, 8) == pytest.approx(2.0) and m.seconds(1, 6) == pytest.approx(1.6)
    assert m.seconds(1, 2) == pytest.approx(0.8)            # extrapolated along the same line
    with pytest.raises(KeyError):
        m.seconds(4, 8)


def test_two_core_machine_prefers_no_ray_and_never_a_bad_split():
    """On 2 cores the 2-thread reference (no Ray) is the fastest; under Ray the one-thread 2-stage split, the
    2-thread single stage and 2 replicas come within a few per cent of each other (as measured), and the
    planner must not pick a split that halves the work badly ([[0, 1], [2, 3]])."""
    prof = vgim_on_two_cores()
    reference = plan(prof, workers=1, ray=False)
    assert [s.modules for s in reference.stages] == [[0, 1, 2, 3]] and reference.threads == 2
    assert reference.step_s == pytest.approx(sum([1.06, 0.34, 0.20, 0.10]))
    plans = rank(prof, workers=3)
    best = plans[0]
    assert reference.step_s < best.step_s
    # fewer stages among equals: [[0], [1, 2, 3]] rather than [[0], [1, 2], [3]] at the same time
    assert [s.modules for s in best.stages] == [[0], [1, 2, 3]] and best.threads == 1
    # one thread each: Ray's processes cost a lone worker nothing measurable; module 0 is the bottleneck
    assert best.step_s == pytest.approx(2.04 + 3 * 2e-4 + 2 * 2**20 / 1e9, rel=1e-3)
    assert best.bottleneck == "stage 0"
    # two threads that meet at every operator's barrier run while both hold a core: 0.9 ** 2 of the time
    one_worker = estimate(prof, [[0, 1, 2, 3]], [1], threads=2)
    assert one_worker.step_s == pytest.approx(reference.step_s / 0.9 ** 2)
    assert one_worker.step_s < best.step_s * 1.05
    bad_split = estimate(prof, [[0, 1], [2, 3]], [1, 1], threads=1)
    assert bad_split.step_s > best.step_s * 1.2
    # the two replicas advance in lockstep, so they cannot overlap with stage 1 on two cores
    replicated = estimate(prof, [[0], [1, 2, 3]], [2, 1], threads=1)
    assert replicated.bottleneck == "stages 0+1 share cores"
    assert replicated.step_s == pytest.approx(replicated.stages[0].step_s + replicated.stages[1].step_s)
    text = table(prof, plans)
    assert f"chosen: {best.describe()}" in text and "runners-up:" in text
    assert text.count("s/step (") == 2


def test_enough_cores_make_the_split_and_replicas_pay():
    prof = balanced(cores=4)
    best = plan(prof, workers=4)
    assert best.workers == 4 and best.threads == 1
    # four workers on four cores, each with a quarter of the work at one thread (1.0 s), versus 3.2 s at 4 threads
    assert best.step_s < 1.3
    assert plan(prof, workers=1, ray=False).step_s == pytest.approx(3.2)          # the reference runner: no Ray
    assert plan(prof, workers=1).step_s == pytest.approx(3.2 / (1 - 0.2 / 4) ** 4)  # 4 threads beside Ray
    assert plan(prof, workers=2, stages=[[0, 1], [2, 3]]).stages[0].modules == [0, 1]    # pinned split
    pinned = rank(prof, workers=4, replicate=False)
    assert all(s.replicas == 1 for p in pinned for s in p.stages)


def test_gpu_links_and_sharing_a_device():
    prof = balanced(cores=16, device="cuda", memory=80 * GiB)
    one_gpu = estimate(prof, [[0, 1], [2, 3]], [1, 1], threads=1, gpus=1)
    assert one_gpu.links == ["staged"] and one_gpu.gpus_per_worker == 0.5
    # time-sliced on one device: the two stages' times add up, no better than one worker
    assert one_gpu.step_s == pytest.approx(sum(s.step_s for s in one_gpu.stages))
    assert one_gpu.bottleneck.startswith("GPU 0")
    assert plan(prof, workers=2, gpus=1).workers == 1
    two_gpus = estimate(prof, [[0, 1], [2, 3]], [1, 1], threads=1, gpus=2)
    assert two_gpus.links == ["nccl"] and two_gpus.gpus_per_worker == 1.0
    assert two_gpus.step_s == pytest.approx(max(s.step_s for s in two_gpus.stages))
    # NCCL cannot put two replicas of one stage on one device
    assert estimate(prof, [[0, 1, 2, 3]], [2], threads=1, gpus=1) is None
    # three workers on two GPUs: two share GPU 0
    three = estimate(prof, [[0], [1], [2, 3]], [1, 1, 1], threads=1, gpus=2)
    assert three.links == ["staged", "nccl"] and three.gpus_per_worker == 0.666


def test_memory_rules_out_layouts():
    prof = balanced(cores=16, device="cuda", memory=int(2.5 * GiB))
    # the whole model needs 4 GiB at the full batch on one device: only layouts over two GPUs fit
    best = plan(prof, workers=2, gpus=2)
    assert best.workers == 2 and all(s.memory_bytes <= 2 * GiB for s in best.stages)
    assert estimate(prof, [[0, 1, 2, 3]], [1], threads=1, gpus=2) is None
    with pytest.raises(ValueError, match="no layout"):
        plan(prof, workers=1, gpus=1)


def test_profile_round_trips_through_json():
    prof = vgim_on_two_cores()
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again == prof and again.thread_counts == [1, 2]


def test_cost_model_constants_change_the_estimate():
    prof = vgim_on_two_cores()
    slow = estimate(prof, [[0], [1, 2, 3]], [2, 1], threads=1, cost=CostModel(host_link=1e7))
    fast = estimate(prof, [[0], [1, 2, 3]], [2, 1], threads=1)
    assert slow.stages[0].allreduce_s > 10 * fast.stages[0].allreduce_s


# --------------------------------------------------------------------------------------------- measured


TINY = ["data.crop=2560", "data.batch_size=4"]


def test_profile_measures_every_module_and_is_cached(tmp_path):
    cfg = load_config("configs/smoke.yaml", [*TINY, f"run.dir={tmp_path}"])
    prof = cached_profile(cfg, "cpu", threads=[1], steps=2)
    assert [m.module for m in prof.modules] == [0, 1, 2, 3]
    for m in prof.modules:
        assert {(t.threads, t.rows) for t in m.timings} == {(1, 4), (1, 2)}
        assert all(t.seconds > 0 for t in m.timings) and m.param_bytes > 0
    # each module sends its channels x frames per window, fp32
    shapes = describe(cfg.model, 2560)
    assert [m.out_bytes_per_row for m in prof.modules] == [r["channels"] * r["frames"] * 4 for r in shapes]
    assert prof.modules[0].peak_bytes > 0 and prof.cost_s > 0
    cached = list((tmp_path / "plan").glob("profile-*.json"))
    assert len(cached) == 1
    assert cached_profile(cfg, "cpu") == prof                    # read back, not measured again
    other = load_config("configs/smoke.yaml", ["data.crop=2560", "data.batch_size=2", f"run.dir={tmp_path}"])
    cached_profile(other, "cpu", threads=[1], steps=1)
    assert len(list((tmp_path / "plan").glob("profile-*.json"))) == 2  # another batch shape, another profile


@pytest.mark.slow
def test_vgim_plan_command(tmp_path):
    out = subprocess.run([BIN / "vgim", "plan", "configs/smoke.yaml", "--workers", "3", "--json",
                          *[a for s in [*TINY, f"run.dir={tmp_path}", "run.threads=1"] for a in ("--set", s)]],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got["workers"] == 3 and got["gpus"] == 0 and len(got["runners_up"]) == 2
    chosen = got["chosen"]
    assert chosen["workers"] <= 3 and chosen["threads"] == 1
    assert [i for s in chosen["stages"] for i in s["modules"]] == [0, 1, 2, 3]
    assert chosen["step_s"] <= min(r["step_s"] for r in got["runners_up"]) * 1.02
    assert "pipeline.stages=" in got["overrides"][0]
    text = subprocess.run([BIN / "vgim", "plan", "configs/smoke.yaml", "--workers", "3",
                           *[a for s in [*TINY, f"run.dir={tmp_path}", "run.threads=1"] for a in ("--set", s)]],
                          capture_output=True, text=True, check=True).stdout
    for words in ("chosen:", "bottleneck", "memory/worker", "runners-up:", "run it with:",
                  "without Ray (run.runner=reference, 1 thread): "):
        assert words in text


@pytest.mark.slow
def test_auto_is_resolved_before_the_run(tmp_path):
    from vgim_dist.launch import train

    summary = train(load_config("configs/smoke.yaml", [*TINY, f"run.dir={tmp_path}", "run.steps=2",
                                                       "pipeline.stages=auto", "run.threads=1",
                                                       "tracking.enabled=true", "tracking.system_metrics=false"]))
    # the reference runner is one worker: one stage holding every module
    assert summary["stages"] == [[0, 1, 2, 3]] and summary["plan"]["workers"] == 1
    written = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert written["stages"][0]["modules"] == [0, 1, 2, 3] and written["profile_cost_s"] > 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["pipeline"]["stages"] == [[0, 1, 2, 3]]
    # MLflow has it too: the parent run's summary.json artifact (embedded store under run.dir)
    logged = [json.loads(p.read_text()) for p in (tmp_path / "mlartifacts").rglob("summary.json")]
    assert logged and logged[0]["plan"]["stages"][0]["modules"] == [0, 1, 2, 3]


def test_gpus_without_a_gpu_to_profile_on_is_a_clear_error(tmp_path):
    out = subprocess.run([BIN / "vgim", "plan", "configs/smoke.yaml", "--gpus", "2", "--set", f"run.dir={tmp_path}"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "run.device: cpu profiles the modules on cpu, but 2 GPUs" in out.stderr
    assert not (tmp_path / "plan").exists()


def test_auto_needs_a_plan_before_use():
    cfg = load_config("configs/smoke.yaml", ["pipeline.stages=auto"])
    with pytest.raises(ConfigError, match="auto has not been planned"):
        cfg.stage_modules()
    with pytest.raises(ConfigError, match="replicas: auto needs run.runner: pipeline"):
        load_config("configs/smoke.yaml", ["pipeline.replicas=auto"])


def test_flops_counted_from_shapes_match_torchs_counter():
    """The MFU numerator: within 10 % of what torch's FlopCounterMode sees in a real training step (which
    leaves out the elementwise positive scores that the shape count includes)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vgim_dist.data.source import NoiseSource
    from vgim_dist.model.flops import step_flops
    from vgim_dist.train.stage import Stage

    cfg = load_config("configs/smoke.yaml", ["pipeline.stages=[[0], [1], [2], [3]]"])
    counted = step_flops(cfg.model, cfg.data.batch_size, cfg.data.crop)
    x = NoiseSource(cfg.data, 0).batch(0)
    for i in range(4):
        stage = Stage(cfg, i)
        with FlopCounterMode(display=False) as seen:
            y, _ = stage.train_step(x)
        assert seen.get_total_flops() == pytest.approx(counted[i], rel=0.10), f"module {i}"
        x = y


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py --dry-run: every part of the GPU check on CPU, one JSON and one Markdown file.
    Of the correctness part (`pytest -m gpu`, minutes on this CPU in full) only the bf16 test runs here, on the
    CPU: its verdict reaches the JSON; the cuda params of the others are deselected."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path),
                    "--tests-k", "bf16"], env=env, check=True, capture_output=True, timeout=850)
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    assert got["dry_run"] and got["environment"]["torch"] == torch.__version__
    tier = got["correctness"]
    assert tier["verdict"] == "passed" and tier["device"] == "cpu (dry run)", tier
    assert [(t["test"], t["verdict"]) for t in tier["tests"]] == [
        ("test_train::test_bf16_autocast_trains_close_to_fp32[cuda]", "passed")]
    assert [r["precision"] for r in got["reference"]] == ["bf16", "fp32"]
    for r in got["reference"]:
        assert r["step_s"] > 0 and r["tflops_per_step"] > 0 and "error" not in r
    assert "chosen:" in got["plan"]["table"]
    assert got["pipeline"]["pipeline_step_s"] > 0 and got["pipeline"]["reference_step_s"] > 0
    assert got["loader"]["windows_per_s_one_process"] > 0
    assert "skipped" in got["compile"] or got["compile"].get("compiled") is True
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Correctness: `pytest -m gpu` on cpu (dry run): passed", "## Reference step", "## vgim plan",
                    "## Pipeline", "## Loader", "## torch.compile"):
        assert heading in md


def test_a_planned_run_replans_with_the_planner_and_its_threads(tmp_path):
    from vgim_dist.plan.auto import replanner, resolve

    cfg, planned = resolve(load_config("configs/smoke.yaml", [
        *TINY, f"run.dir={tmp_path}", "run.runner=pipeline", "pipeline.stages=auto", "pipeline.workers=3",
        "run.threads=1"]))
    replan = replanner(cfg, planned)
    assert replanner(load_config("configs/smoke.yaml"), None) is None   # a split given by hand: the runner's
    assert replan(cfg.stage_modules(), cfg.stage_replicas(), 1) == ([[0, 1, 2, 3]], [1])
    stages, replicas = replan(cfg.stage_modules(), cfg.stage_replicas(), 2)
    assert [i for s in stages for i in s] == [0, 1, 2, 3] and len(stages) <= 2 and replicas == [1] * len(stages)
