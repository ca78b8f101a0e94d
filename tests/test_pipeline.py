"""The pipeline runner on a local Ray head: bitwise equal to the reference runner with 2 and 4 stages (run.dir
local and on S3), recovery from a SIGKILLed stage worker, Ctrl-C then --resume, and `ray job submit`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient
from safetensors.torch import load

from vgim_dist.config import load_config
from vgim_dist.launch import train
from vgim_dist.model import loss_terms
from vgim_dist.pipeline.runner import PipelineRunner
from vgim_dist.storage import StorageFault
from vgim_dist.train.checkpoint import CheckpointManager

from helpers import FAST, GPU_DRY_RUN, assert_bitwise_equal, expected_link, free_port, on, placements
from outage import OutageProxy

BIN = Path(sys.executable).parent
PIPELINE = [*FAST, "run.runner=pipeline", "checkpoint.every=10"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class Head:
    address: str        # GCS, for ray.init and `vgim train --address`
    dashboard: str      # HTTP, for `ray job submit`
    env: dict[str, str]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3_endpoint):
    """A one-node Ray cluster on 127.0.0.1 (`ray start --head --block`), stopped at the end of the session with
    every process it started. It inherits the S3 test credentials, so its workers can write s3:// runs."""
    temp = tmp_path_factory.mktemp("ray")
    gcs, dashboard = free_port(), free_port()
    # Ray Train's controller collects reports, and so releases a checkpointing worker, once per health check
    # (2 s by default): poll faster so that checkpoints every few steps do not dominate these short runs.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         # Four CPUs to Ray on a machine of two cores: the two-thread test's workers reserve two each (a
         # worker's threads never outnumber its reserved CPUs, layout.worker_cpus); these runs test results.
         "--num-cpus=4", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("ray start --head did not come up") from None
            time.sleep(0.2)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"):
            mp.setenv(k, env[k])
        yield Head(f"127.0.0.1:{gcs}", url, env)
    proc.terminate()
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while (left := _ray_processes(temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes left behind: {left}"


def _ray_processes(temp: Path) -> list[str]:
    """Command lines of live processes that belong to the Ray session under ``temp``."""
    found = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp) in cmd:
            found.append(cmd[:200])
    return found


@pytest.fixture
def on_head(ray_head, monkeypatch):
    """In-process pipeline runs join the session's head instead of starting Ray."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head.address)
    return ray_head


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Reference-runner checkpoints of the smoke config, keyed by steps, thread count and placement (helpers.py:
    the reference runs every stage in this process, on the placement's device)."""
    def run(steps: int, threads: int = 1, placement: str = "cpu") -> dict[str, torch.Tensor]:
        device = [o for o in on(placement) if o.startswith("run.")]
        run_dir = tmp_path_factory.getbasetemp() / f"reference-{steps}-{threads}{'-'.join(['', *device])}"
        if not run_dir.exists():
            train(load_config("configs/smoke.yaml", [*FAST, f"run.dir={run_dir}", f"run.steps={steps}",
                                                     f"run.threads={threads}", *device]))
        return stored_state(str(run_dir))
    return run


def stored_state(run_dir: str, endpoint: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a run's latest checkpoint (local or s3://): weights, buffers, optimizer, RNG."""
    ckpt = CheckpointManager(run_dir, endpoint_url=endpoint)
    files = ckpt.fs.glob(f"{ckpt.step_dir(ckpt.latest())}/*.safetensors")
    assert files
    return {k: v for f in sorted(files) for k, v in load(ckpt.fs.cat_file(f)).items()}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(head: Head, run_dir: Path, *args: str, placement: str = "cpu") -> list[str]:
    sets = [a for s in [*PIPELINE, f"run.dir={run_dir}", *on(placement)] for a in ("--set", s)]
    return [str(BIN / "vgim"), "train", "configs/smoke.yaml", *sets, "--address", head.address, *args]


def check_placement(run_dir: Path, placement: str) -> None:
    """Where the stage workers ran: on the placement's devices, with its kind of link between them (two
    stages sharing a GPU: the same GPU, linked through host memory; a GPU each: distinct GPUs, NCCL)."""
    workers = [json.loads(f.read_text()) for f in sorted((run_dir / "workers").iterdir())]
    cuda = placement != "cpu" and not GPU_DRY_RUN
    assert all(w["device"].startswith("cuda") == cuda for w in workers), workers
    assert workers[0]["links"] == {"1": expected_link(placement)}, workers
    assert workers[1]["links"] == {"0": expected_link(placement)}, workers


@pytest.mark.parametrize("placement", placements("cpu", "cuda-shared", "cuda-2"))
def test_two_stages_equal_the_reference(on_head, reference, tmp_path, mlflow_server, placement):
    """Bitwise equal to the reference runner, with deterministic algorithms (the default); on CUDA too: two
    stages on half a GPU each (the host-staged link, fractional GPUs), or on a GPU each (NCCL)."""
    cfg = load_config("configs/smoke.yaml", [*PIPELINE, f"run.dir={tmp_path}", "run.steps=20",
                                             "pipeline.stages=[[0],[1,2,3]]", "tracking.enabled=true",
                                             f"tracking.uri={mlflow_server}", *on(placement)])
    assert cfg.run.deterministic
    summary = train(cfg)
    assert_bitwise_equal(stored_state(str(tmp_path)), reference(20, placement=placement))
    check_placement(tmp_path, placement)
    assert summary["threads"] == 1
    assert [json.loads(f.read_text())["threads"] for f in sorted((tmp_path / "workers").iterdir())] == [1, 1]
    assert summary["steps"] == 20 and len(summary["stage_stats"]) == 2
    assert logged_steps(tmp_path) == list(range(2, 21, 2))
    row = json.loads((tmp_path / "summary.json").read_text())["final"]
    for key in ("module.3.nce", "stage.0.wait_consumer_frac", "stage.1.wait_input_frac", "stage.0.in_flight",
                "stage.1.step_time_s", "windows_per_s"):
        assert key in row
    assert 0 < row["stage.0.in_flight"] <= 2
    # Each stage's child run: its modules' losses, its own pace and waits (as docs/tracking.md lists them).
    client = MlflowClient(mlflow_server)
    for s, modules in enumerate([[0], [1, 2, 3]]):
        run_id = json.loads((tmp_path / "mlflow.json").read_text())["stages"][s]["run_id"]
        keys = {k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")}
        own = {f"module.{i}.{t}" for i in modules for t in loss_terms(cfg.model, i)}
        stats = {f"stage.{s}.{k}" for k in ("wait_input_frac", "wait_consumer_frac", "step_time_s", "in_flight")}
        assert keys == own | stats | {"step_time_s", "windows_per_s"}
        assert [m.step for m in client.get_metric_history(run_id, "windows_per_s")] == list(range(2, 21, 2))
    # One parent, a child per stage, each with its own worker process's system metrics.
    ids = json.loads((tmp_path / "mlflow.json").read_text())
    parent = client.get_run(ids["parent_run_id"])
    assert parent.info.run_name == "smoke V-GIM s0 pipeline 20 steps on noise"
    assert "mlflow.parentRunId" not in parent.data.tags
    stages = client.search_runs([ids["experiment_id"]], f"tags.mlflow.parentRunId = '{ids['parent_run_id']}'")
    assert sorted(r.info.run_name for r in stages) == ["stage-0 (M0)", "stage-1 (M1-M3)"]
    assert all(r.info.status == "FINISHED" for r in [parent, *stages])
    for r in stages:
        assert {"system/process_cpu_percent", "system/process_rss_mb"} <= set(r.data.metrics), r.info.run_name
    assert not any(k.startswith("system/") for k in parent.data.metrics)   # the driver does not train


@pytest.mark.timeout(600)      # four threads on two cores
def test_two_threads_per_stage_equal_the_reference_at_two_threads(on_head, reference, tmp_path):
    # The condition for equality: every stage uses the reference's thread count.
    train(load_config("configs/smoke.yaml", [*PIPELINE, f"run.dir={tmp_path}", "run.steps=4", "run.threads=2",
                                             "pipeline.stages=[[0],[1,2,3]]"]))
    assert [json.loads(f.read_text())["threads"] for f in sorted((tmp_path / "workers").iterdir())] == [2, 2]
    assert_bitwise_equal(stored_state(str(tmp_path)), reference(4, threads=2))


def test_worker_that_cannot_see_run_dir_fails_at_once_naming_it(on_head, tmp_path):
    # What a worker on a node without the driver's local run.dir sees: no run directory prepared there.
    cfg = load_config("configs/smoke.yaml", [*PIPELINE, f"run.dir={tmp_path / 'elsewhere'}", "run.steps=4"])
    with pytest.raises(StorageFault, match=rf"run.dir {tmp_path / 'elsewhere'}: not visible from this worker"):
        PipelineRunner(cfg).run()
    assert not (tmp_path / "elsewhere" / "checkpoints").exists()


def test_probe_curves_on_a_pipeline_run(on_head, deboer_dir, tmp_path):
    """The background evaluator as a Ray actor beside the stages: a probe point for step 0 and the last
    checkpoint at least (a busy evaluator may skip those between), in metrics.jsonl."""
    from vgim_dist.cli import main as data_main

    syllables = str(tmp_path / "syllables")
    assert data_main(["data", "prepare", str(deboer_dir), "--format", "deboer", "--level", "syllable",
                      "--syllable-split", "clean", "--out", syllables]) == 0
    run = tmp_path / "run"
    train(load_config("configs/smoke.yaml", [*PIPELINE, f"run.dir={run}", "run.steps=20",
                                             "pipeline.stages=[[0],[1,2,3]]", "eval.every=1", "eval.cpus=0",
                                             f"eval.data={syllables}", "eval.tasks=[vowels]", "eval.epochs=3"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probed = sorted(r["step"] for r in rows if "probe.vowels.module.3" in r)
    assert probed[0] == 0 and probed[-1] == 20 and set(probed) <= {0, 10, 20}
    assert [r["step"] for r in rows if "module.0.nce" in r] == list(range(2, 21, 2))  # training rows unchanged


def test_four_stages_on_s3_equal_the_reference(on_head, reference, s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("pipeline-runs")
    run_dir = "s3://pipeline-runs/four"
    train(load_config("configs/smoke.yaml", [*PIPELINE, f"run.dir={run_dir}", "run.steps=20",
                                             f"data.endpoint_url={s3_endpoint}",
                                             "pipeline.stages=[[0],[1],[2],[3]]"]))
    assert CheckpointManager(run_dir, endpoint_url=s3_endpoint).steps() == [10, 20]
    assert_bitwise_equal(stored_state(run_dir, s3_endpoint), reference(20))


def kill_after_checkpoint(command: list[str], run_dir: Path, step: int, worker: str,
                          console: list[str] | None = None) -> int:
    """Run ``command``; once it has committed a checkpoint at ``step`` or later, SIGKILL the worker described by
    ``workers/<worker>``; wait for the run to finish on its own. The killed pid; the run's stderr is appended
    to ``console``."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    ckpt = CheckpointManager(str(run_dir))
    deadline = time.monotonic() + 120
    while not (ckpt.steps() and ckpt.steps()[-1] >= step):
        assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint at step {step}"
        time.sleep(0.05)
    victim = json.loads((run_dir / "workers" / worker).read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    if console is not None:
        console.append(err)
    return victim


@pytest.mark.parametrize("placement", placements("cpu", "cuda-shared"))
def test_killed_stage_worker_restarts_from_the_last_checkpoint(ray_head, reference, tmp_path, placement):
    console = []
    victim = kill_after_checkpoint(cli(ray_head, tmp_path, "--set", "run.steps=120", "--set", "run.log_every=10",
                                       placement=placement), tmp_path, 20, "stage-1.json", console)
    workers = [json.loads((tmp_path / "workers" / f"stage-{s}.json").read_text()) for s in (0, 1)]
    assert workers[1]["pid"] != victim
    assert workers[0]["start"] == workers[1]["start"] >= 20      # every rank resumed from the same checkpoint
    # The console: one line for the restart (stage, attempt, resume step), no traceback; Ray's tracebacks are
    # in Ray Train's log files, which the line names.
    err = console[0]
    restarts = re.findall(r"pipeline: stage 1 \(rank 1\) failed \(.+?\); attempt 2 of 4, resuming from step (\d+) "
                          r"\(Ray's traceback: (\S+)\)\n", err)
    assert len(restarts) == 1 and err.count("pipeline: stage") == 1, err
    assert int(restarts[0][0]) == workers[1]["start"]
    # (PlacementGroupCleaner: Ray Train's state query, which fails at its start when another Ray runs on the
    # machine; unrelated to the restart.)
    ours = [line for line in err.splitlines() if not line.startswith("(PlacementGroupCleaner")]
    assert not [line for line in ours if "Traceback" in line or "Error in training function" in line
                or "[FailurePolicy]" in line], err
    logs = "".join(p.read_text() for p in Path(restarts[0][1]).glob("ray-train-sys-*.log"))
    assert "Error in training function" in logs and "Traceback (most recent call last)" in logs
    assert "[FailurePolicy] RETRY" in logs
    check_placement(tmp_path, placement)
    assert_bitwise_equal(stored_state(str(tmp_path)), reference(120, placement=placement))
    assert logged_steps(tmp_path) == list(range(10, 121, 10))


def test_ctrl_c_leaves_a_resumable_checkpoint(ray_head, reference, tmp_path):
    # No periodic checkpoints: the one found afterwards is the one Ctrl-C made.
    proc = subprocess.Popen(cli(ray_head, tmp_path, "--set", "run.steps=100000", "--set", "checkpoint.every=0"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "workers" / "stage-1.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "workers did not start"
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = CheckpointManager(str(tmp_path)).latest()
    assert step and f"stopped at step {step}" in err
    resumed = subprocess.run(cli(ray_head, tmp_path, "--set", f"run.steps={step + 4}", "--resume"),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(stored_state(str(tmp_path)), reference(step + 4))
    steps = logged_steps(tmp_path)
    assert steps == sorted(set(steps)) and steps[-1] == step + 4


def test_ray_job_submit(ray_head, tmp_path):
    job = f"vgim-smoke-{os.getpid()}"
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.dashboard}
    submitted = subprocess.run(
        ["bash", "cluster/submit.sh", f"--submission-id={job}", "--", "configs/smoke.yaml",
         *[a for s in [*PIPELINE, f"run.dir={tmp_path}", "run.steps=10"] for a in ("--set", s)]],
        env=env, capture_output=True, text=True, timeout=240)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert JobSubmissionClient(ray_head.dashboard).get_job_status(job) == JobStatus.SUCCEEDED
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runner"] == "pipeline" and summary["steps"] == 10
    assert CheckpointManager(str(tmp_path)).steps() == [10]


# Replicas: without BatchNorm every tensor is identifiable (see docs/scaling.md), and 5 rows split 3 + 2.
REPLICATED = ["model.batch_norm=false", "data.batch_size=5", "pipeline.stages=[[0],[1,2,3]]",
              "pipeline.replicas=[2,1]"]


def test_replicated_heavy_stage_follows_the_reference(on_head, tmp_path):
    plain = [o for o in REPLICATED if not o.startswith("pipeline.")]
    train(load_config("configs/smoke.yaml", [*FAST, *plain, f"run.dir={tmp_path / 'ref'}", "run.steps=20"]))
    summary = train(load_config("configs/smoke.yaml", [*PIPELINE, *REPLICATED, f"run.dir={tmp_path / 'rep'}",
                                                       "run.steps=20"]))
    got, want = stored_state(str(tmp_path / "rep")), stored_state(str(tmp_path / "ref"))
    assert got.keys() == want.keys()
    for k, v in want.items():
        if k.endswith((".rng", ".step")):
            assert torch.equal(got[k], v), k
        else:
            assert (got[k] - v).abs().max() <= 1e-4 * v.abs().max() + 1e-5, k
    assert summary["steps"] == 20 and logged_steps(tmp_path / "rep") == list(range(2, 21, 2))
    assert {p.name for p in (tmp_path / "rep" / "workers").iterdir()} == {
        "stage-0.json", "stage-0-replica-1.json", "stage-1.json"}


def test_killed_replica_worker_restarts_from_the_last_checkpoint(ray_head, on_head, tmp_path):
    steps = ["run.steps=60", "run.log_every=10"]
    train(load_config("configs/smoke.yaml", [*PIPELINE, *REPLICATED, *steps, f"run.dir={tmp_path / 'straight'}"]))
    run_dir = tmp_path / "killed"
    victim = kill_after_checkpoint(cli(ray_head, run_dir, *[a for s in [*REPLICATED, *steps] for a in ("--set", s)]),
                                   run_dir, 10, "stage-0-replica-1.json")
    assert json.loads((run_dir / "workers" / "stage-0-replica-1.json").read_text())["pid"] != victim
    assert_bitwise_equal(stored_state(str(run_dir)), stored_state(str(tmp_path / "straight")))
    assert logged_steps(run_dir) == list(range(10, 61, 10))


def test_truncated_checkpoint_in_the_recovery_path_falls_back_to_an_intact_step(ray_head, reference, tmp_path):
    """A worker dies while the newest committed checkpoint has a half-truncated file: the restarted group passes
    over it to the step before and ends bitwise equal to an uninterrupted run."""
    proc = subprocess.Popen(cli(ray_head, tmp_path, "--set", "run.steps=60", "--set", "run.log_every=10"),
                            stderr=subprocess.PIPE, text=True)
    ckpt = CheckpointManager(str(tmp_path))
    deadline = time.monotonic() + 120
    while len(ckpt.steps()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no second checkpoint"
        time.sleep(0.05)
    victim = json.loads((tmp_path / "workers" / "stage-1.json").read_text())["pid"]
    os.kill(victim, signal.SIGSTOP)     # the pipeline halts: no newer step can commit
    steps, still = ckpt.steps(), time.monotonic()
    while time.monotonic() - still < 3:  # a commit already past its barrier lands
        if ckpt.steps() != steps:
            steps, still = ckpt.steps(), time.monotonic()
        time.sleep(0.1)
    newest = steps[-1]
    damaged = Path(ckpt.step_dir(newest)) / "module-0.train.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"{damaged}: " in err and f"falling back to checkpoint step {newest - 10}" in err
    workers = [json.loads((tmp_path / "workers" / f"stage-{s}.json").read_text()) for s in (0, 1)]
    assert workers[0]["start"] == workers[1]["start"] == newest - 10
    assert_bitwise_equal(stored_state(str(tmp_path)), reference(60))
    assert logged_steps(tmp_path) == list(range(10, 61, 10))


def test_run_store_outage_is_waited_out(on_head, reference, s3_endpoint):
    """The S3 endpoint holding run.dir goes away for 45 s mid-run (connections reset, then refused) and comes
    back: the run waits, retries its checkpoint and metrics writes, and ends bitwise equal to an uninterrupted one."""
    import s3fs

    store = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    store.mkdir("outage-runs")
    proxy = OutageProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    run_dir = "s3://outage-runs/run"
    cfg = load_config("configs/smoke.yaml", [*PIPELINE, f"run.dir={run_dir}", "run.steps=60", "run.log_every=10",
                                             f"data.endpoint_url={proxy.url}"])
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=train(cfg)))
    runner.start()
    deadline = time.monotonic() + 120
    while not store.exists("outage-runs/run/checkpoints/step-10/checkpoint.json"):
        assert runner.is_alive() and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    proxy.down()
    time.sleep(45)
    assert runner.is_alive()
    proxy.up()
    runner.join(timeout=240)
    proxy.close()
    assert result["summary"]["steps"] == 60
    assert_bitwise_equal(stored_state(run_dir, s3_endpoint), reference(60))
    rows = store.cat_file("outage-runs/run/metrics.jsonl").decode().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(10, 61, 10))


def test_full_disk_stops_the_pipeline_after_one_restart(ray_head, small_disk):
    """ENOSPC while a stage writes its step-20 checkpoint: no retry can fix it, so the group is restarted once
    (its workers end at once) and `vgim train` exits 1 with one line naming the path and the free space."""
    run = subprocess.run(cli(ray_head, small_disk, "--set", "run.steps=60", "--set", "run.log_every=10"),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"vgim: {small_disk}/\S+: no space left on device \([\d,]+ bytes free of "
                        r"[\d,]+; [\d,]+ needed\)", last), run.stderr
    assert len(re.findall(r"pipeline: stage \d \(rank \d\) failed \(StorageFault: .*no space left on device.*\); "
                          r"attempt 2 of 4", run.stderr)) == 1, run.stderr
    assert not [p for p in small_disk.rglob("*") if ".tmp-" in p.name]
    assert CheckpointManager(str(small_disk)).newest_intact() == 10
