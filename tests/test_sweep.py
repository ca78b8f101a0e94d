"""`vgim sweep` on a local Ray cluster: the sweep file's checks, a 2 x 2 sweep with probes at concurrency 2, a
failing trial beside passing ones, and a killed driver resumed with --resume (docs/sweeps.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vgim_dist.cli import main
from vgim_dist.config import ConfigError
from vgim_dist.launch import train
from vgim_dist.sweep.spec import load_sweep, plan, trial_config

from helpers import assert_bitwise_equal, final_state

# The smoke config, small and single-stage: a trial trains in a second or two.
SET = {"run": {"steps": 8, "log_every": 2}, "data": {"crop": 2560, "batch_size": 4},
       "pipeline": {"stages": []}, "checkpoint": {"every": 4}, "tracking": {"system_metrics": False}}


def sweep_file(tmp_path: Path, name: str = "sweep", **fields) -> Path:
    tree = {"base": "configs/smoke.yaml", "dir": str(tmp_path / name), "set": SET} | fields
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run_sweep_cli(path: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgim_dist", "sweep", str(path), *args], capture_output=True,
                          text=True, timeout=300, **kw)


def rows(sweep_dir: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((sweep_dir / "summary.json").read_text())}


# --------------------------------------------------------------------------------------------- the file


@pytest.mark.parametrize("fields, message", [
    ({"conurrency": 2}, "unknown config key 'conurrency'; did you mean concurrency?"),
    ({"space": {"model.kld_wieght": [0, 1]}},
     "space.model.kld_wieght: not a config key; did you mean model.kld_weight?"),
    ({"space": {"seed": {"gird": [0]}}}, "unknown config key 'space.seed.gird'; did you mean space.seed.grid?"),
    ({"space": {"optim.lr": [0.1, -1]}}, "trial 001-lr=-1: optim.lr: expected float >= 0.0, got -1.0"),
    ({"space": {"optim.lr": {"uniform": [1, 0]}}}, "space.optim.lr.uniform: expected [low, high] with low < high"),
    ({"space": {"seed": {"grid": [0], "choice": [1]}}}, "space.seed: give exactly one of grid, choice"),
    ({"resources": {"gpus": "half"}}, "resources.gpus: expected a number, got 'half'"),
    ({"eval": [{"task": "syllables", "data": "x"}], "metric": {"module": 4}}, "metric.module: 4, but trial 000"),
    ({"eval": [{"task": "sylables", "data": "x"}]}, "eval.0.task: expected one of"),
    ({"stopping": {"scheduler": "asha"}}, "stopping.scheduler: asha stops on the syllables probe curve, but trial "
                                          "000 has eval.every 0"),
    ({"stopping": {"scheduler": "hyperband"}}, "stopping.scheduler: expected one of ['none', 'asha', 'median']"),
])
def test_a_bad_sweep_file_fails_before_anything_starts(tmp_path, fields, message):
    path = sweep_file(tmp_path, **fields)
    with pytest.raises(ConfigError) as e:
        plan(load_sweep(path), path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "sweep").exists()


def test_dry_run_prints_every_trial_grids_crossed_and_draws_repeatable(tmp_path, capsys):
    path = sweep_file(tmp_path, space={"config": ["configs/smoke.yaml", "configs/cpc.yaml"],
                                       "optim.lr": {"loguniform": [1e-4, 1e-2]}}, samples=2,
                      resources={"cpus": 0.5, "gpus": 0.25})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 trials") and out.count("config=smoke,") == 2 and out.count("config=cpc,") == 2
    assert "{'CPU': 0.5, 'GPU': 0.25}" in out and not (tmp_path / "sweep").exists()
    again = [t.params for t in plan(load_sweep(path), path)]
    assert again == [t.params for t in plan(load_sweep(path), path)]      # the sweep's seed fixes the draws
    trials = plan(load_sweep(path), path)
    assert trial_config(trials[1].config).model.modules != trial_config(trials[0].config).model.modules
    assert trial_config(trials[0].config).run.dir == str(tmp_path / "sweep" / "trials" / trials[0].name)
    assert trial_config(trials[0].config).run.threads == 1     # a trial's share of the CPUs, not the machine's


# --------------------------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def syllables(deboer_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sweep-data") / "syllables")
    assert main(["data", "prepare", str(deboer_dir), "--format", "deboer", "--level", "syllable",
                 "--syllable-split", "clean", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_a_2x2_sweep_runs_two_at_once_probes_each_trial_and_nests_its_mlflow_runs(tmp_path, syllables):
    path = sweep_file(tmp_path, space={"seed": [0, 1], "model.kld_weight": [0.0, 0.01]}, concurrency=2,
                      eval=[{"task": "vowels", "data": syllables, "epochs": 5, "baseline": False}])
    done = run_sweep_cli(path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweep"
    got = rows(sweep)
    assert len(got) == 4 and {r["status"] for r in got.values()} == {"FINISHED"}
    scores = [r["metrics"]["score"] for r in json.loads((sweep / "summary.json").read_text())]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for name in got:
        trial = sweep / "trials" / name
        assert (trial / "summary.json").is_file() and list((trial / "eval").glob("probe-vowels*.json"))
    # Two at once: some trial started before another had finished.
    spans = sorted(((sweep / "trials" / n / "config.yaml").stat().st_mtime,
                    (sweep / "trials" / n / "trial.json").stat().st_mtime) for n in got)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))

    from mlflow import MlflowClient

    ids = json.loads((sweep / "mlflow.json").read_text())
    c = MlflowClient(ids["tracking_uri"])
    runs = c.search_runs([ids["experiment_id"]], max_results=200)
    by_parent: dict[str, list] = {}
    for r in runs:
        by_parent.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    trial_runs = by_parent[ids["run_id"]]
    assert len(trial_runs) == 4 and {r.data.params["model.kld_weight"] for r in trial_runs} == {"0.0", "0.01"}
    assert all(by_parent.get(r.info.run_id) for r in trial_runs)      # stage and probe runs under each trial
    sweep_run = c.get_run(ids["run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.metrics["trials_finished"] == 4
    assert "summary.md" in {a.path for a in c.list_artifacts(ids["run_id"])}

    # The report: per probe and module, accuracy against the swept KL weight over the 2 seeds of each value.
    assert main(["report", str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert md.count("### module ") == 4 and "| model.kld_weight | accuracy | step 0 | trials | failed | runs |" in md
    assert " ± " in md and "| 0.01 | " in md
    assert "| 2 |  | 001-seed=0-kld_weight=0.01, 003-seed=1-kld_weight=0.01 |" in md
    page = (sweep / "report.html").read_text()
    assert "<a href='trials/000-seed=0-kld_weight=0/eval/report.html'>" in page and "data:image/png" in page
    assert (sweep / "trials" / "000-seed=0-kld_weight=0" / "eval" / "report.html").is_file()
    assert {"report.html", "report.md", "report-plots"} <= {a.path for a in c.list_artifacts(ids["run_id"])}


@pytest.mark.slow
def test_failing_trials_beside_passing_ones_and_a_killed_driver_resumed(tmp_path):
    # prediction_steps 500 passes the schema but not the launch's check (too few frames): a trial error. One at
    # a time: the first finishes, the second fails, the driver is killed while the third is between checkpoints.
    path = sweep_file(tmp_path, space={"model.prediction_steps": [10, 500, 10]}, concurrency=1,
                      set=SET | {"run": {"steps": 60, "log_every": 10}, "checkpoint": {"every": 10},
                                 "tracking": {"enabled": False}})
    sweep = tmp_path / "sweep"
    first, second = (sweep / "trials" / f"00{i}-prediction_steps=10" for i in (0, 2))
    env = os.environ | {"VGIM_DEBUG": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "vgim_dist", "sweep", str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not (list((second / "checkpoints").glob("step-*")) if (second / "checkpoints").is_dir() else []):
        assert driver.poll() is None and time.monotonic() < deadline, "the second trial never checkpointed"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (second / "summary.json").exists()
    finished = (first / "trial.json").stat().st_mtime_ns
    committed = {p.name: p.stat().st_mtime_ns for p in (second / "checkpoints").glob("step-*")}

    done = run_sweep_cli(path, "--resume")
    assert done.returncode == 1, done.stderr[-3000:]
    got = rows(sweep)
    assert [got[n]["status"] for n in sorted(got)] == ["FINISHED", "FAILED", "FINISHED"]
    failed = got["001-prediction_steps=500"]["error"]
    assert failed.startswith("module 0 emits 127 frames for data.crop = 2560") and "\n" not in failed
    assert "1 of 3 trials did not finish: 001-prediction_steps=500" in done.stderr
    assert (first / "trial.json").stat().st_mtime_ns == finished          # finished: not run again
    assert main(["report", str(sweep), "--no-runs", "--no-mlflow"]) == 0
    assert "## Trials that did not finish" in (md := (sweep / "report.md").read_text())
    assert f"| 001-prediction_steps=500 | FAILED | {failed} |" in md
    # Unfinished: continued from its checkpoints, which it did not write again.
    assert {p: (second / "checkpoints" / p).stat().st_mtime_ns for p in committed} == committed

    # Bitwise the numbers of an uninterrupted run of the same config.
    cfg = trial_config((second / "config.yaml").read_text())
    cfg.run.dir = str(tmp_path / "uninterrupted")
    train(cfg)
    assert_bitwise_equal(final_state(second), final_state(tmp_path / "uninterrupted"))


@pytest.mark.slow
def test_a_pipeline_trial_beside_a_single_process_trial_in_s3_same_numbers_and_resumed_once_finished(
        tmp_path, s3_endpoint):
    # 0.1 CPU for the pipeline trial's driver + its 2 workers at 0.4 each + the reference trial's 1 CPU: both
    # fit on 2 CPUs at once. The pipeline's workers are one Ray Train placement group: all placed, or none.
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("sweeps")
    path = sweep_file(tmp_path, dir="s3://sweeps/one", concurrency=2, space={"run.runner": ["pipeline", "reference"]},
                      set=SET | {"run": {"steps": 6, "log_every": 2}, "tracking": {"enabled": False},
                                 "pipeline": {"cpus_per_stage": 0.4},
                                 "data": SET["data"] | {"endpoint_url": s3_endpoint}})
    trials = plan(load_sweep(path), path)
    assert [t.bundles for t in trials] == [[{"CPU": 0.1}], [{"CPU": 1.0}]]
    done = run_sweep_cli(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"sweep.json", "summary.md", "trials", "tune"} <= {p.rsplit("/", 1)[-1] for p in fs.ls("sweeps/one")}
    pipeline, reference = (tmp_path / t.name for t in trials)
    for t, local in zip(trials, (pipeline, reference)):
        fs.get(f"sweeps/one/trials/{t.name}", str(local), recursive=True)
    workers = [json.loads(f.read_text()) for f in sorted((pipeline / "workers").glob("*.json"))]
    assert [w["modules"] for w in workers] == [[0], [1, 2, 3]] and len({w["pid"] for w in workers}) == 2
    assert_bitwise_equal(final_state(pipeline), final_state(reference))

    record = f"sweeps/one/trials/{trials[0].name}/trial.json"
    before = fs.info(record)["LastModified"]
    again = run_sweep_cli(path, "--resume")                        # all finished: nothing runs again
    assert again.returncode == 0, again.stderr[-3000:]
    assert fs.info(record)["LastModified"] == before and "| reference | FINISHED |" in again.stdout


def test_early_stopping_is_off_unless_asked_for_and_then_never_ends_a_trial_at_its_last_step(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    from vgim_dist.sweep.run import scheduler

    assert scheduler(load_sweep(sweep_file(tmp_path)), 8) is None
    asha = scheduler(load_sweep(sweep_file(tmp_path, stopping={"scheduler": "asha", "grace": 4})), 8)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 9 and asha._metric == "probe"
    median = scheduler(load_sweep(sweep_file(tmp_path, stopping={"scheduler": "median"})), 8)
    assert isinstance(median, MedianStoppingRule)


def test_the_shipped_sweeps_plan_the_thesis_grid_and_the_kl_grid():
    thesis = plan(load_sweep("configs/sweeps/thesis.yaml"), "thesis.yaml")
    assert [t.params for t in thesis[:2]] == [{"config": "gim-thesis", "seed": 0}, {"config": "gim-thesis", "seed": 1}]
    assert len(thesis) == 10 and not trial_config(thesis[0].config).model.variational
    assert trial_config(thesis[9].config).model.variational and trial_config(thesis[9].config).run.device == "cpu"
    kld = plan(load_sweep("configs/sweeps/kld.yaml"), "kld.yaml")
    assert len(kld) == 15 and sorted({t.params["model.kld_weight"] for t in kld}) == [0.0, 0.001, 0.0035, 0.01, 0.03]


def test_a_trial_whose_losses_ended_nan_fails_naming_them():
    from vgim_dist.sweep.run import Diverged, check_finite, one_line

    check_finite({"final": {"step": 8, "module.0.nce": 5.9}})
    with pytest.raises(Diverged) as e:
        check_finite({"final": {"step": 8, "module.0.nce": float("nan"), "module.1.nce": 5.0}})
    assert one_line(e.value).startswith("module.0.nce = nan at step 8; lower optim.lr")
