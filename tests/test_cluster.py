"""Several real Ray nodes on this machine (Ray's own multi-node harness, `ray.cluster_utils.Cluster`: a raylet
and an object store per node), with run.dir on moto's S3, shared by all of them as on a real cluster:

- a run submitted with `ray job submit` from a bare copy of the configs, its two stages on two nodes, ends
  bitwise equal to the reference runner; the worker descriptors and the MLflow stage runs name the nodes;
- the node holding a stage is removed mid-run and a fresh one added: the run resumes there; then that node is
  removed with none added: after `pipeline.replan_after_s` the driver re-plans for the one node left; the run
  still ends bitwise equal to the reference;
- `vgim data prepare --address` fans shards out to the cluster's nodes.

The nodes use the machine's address (Ray's harness resolves 127.0.0.1 to it), only for the test's length.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient
from safetensors.torch import load
from test_train import FAST, assert_bitwise_equal

from vgim_dist.config import load_config
from vgim_dist.launch import train
from vgim_dist.storage import open_dir
from vgim_dist.tracking.server import free_port
from vgim_dist.train.checkpoint import CheckpointManager

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
PIPELINE = [*FAST, "run.runner=pipeline", "pipeline.placement=strict_spread", "checkpoint.every=20"]
pytestmark = pytest.mark.timeout(600)


class LocalCluster:
    """A head with no CPUs (the drivers and Ray Train's controller live there) and worker nodes of 1 CPU."""

    def __init__(self):
        self.dashboard_port = free_port()
        # Ray's default temp dir for every node: a driver started on this machine finds them all there and
        # attaches to the head, which no test removes.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": self.dashboard_port,
            # Notice a lost node within about 3 s instead of Ray's default 15 s.
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 6}})
        self.workers = [self.add() for _ in range(2)]

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add(self):
        node = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        return node

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.cluster.worker_nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    def node_ids(self) -> set[str]:
        return {n.node_id for n in self.cluster.worker_nodes}


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Three nodes; they inherit the S3 test credentials. Drivers poll Ray Train's controller every 0.2 s."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "PATH": f"{BIN}:{os.environ['PATH']}"}.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        c = LocalCluster()
        try:
            yield c
        finally:
            c.cluster.shutdown()


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("cluster-runs")
    return "s3://cluster-runs"


def reference_state(run_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    train(load_config("configs/smoke.yaml", [*FAST, f"run.dir={run_dir}", f"run.steps={steps}"]))
    return stored_state(str(run_dir))


def stored_state(run_dir: str, endpoint: str = "") -> dict[str, torch.Tensor]:
    ckpt = CheckpointManager(run_dir, endpoint_url=endpoint)
    files = ckpt.fs.glob(f"{ckpt.step_dir(ckpt.latest())}/*.safetensors")
    return {k: v for f in sorted(files) for k, v in load(ckpt.fs.cat_file(f)).items()}


def descriptor(run_dir: str, endpoint: str, name: str) -> dict | None:
    fs, root = open_dir(run_dir, endpoint)
    fs.invalidate_cache()
    path = f"{root}/workers/{name}.json"
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


@pytest.mark.slow
def test_stages_on_two_nodes_submitted_with_ray_job_submit(cluster, bucket, s3_endpoint, mlflow_server, tmp_path):
    # What a cluster user ships: the submit script and a config. The driver runs on the head in Ray's copy of
    # this folder, with the store for everything else.
    checkout = tmp_path / "checkout"
    for part in ("cluster", "configs"):
        shutil.copytree(ROOT / part, checkout / part)
    before = sorted(p.relative_to(checkout) for p in checkout.rglob("*"))
    run_dir, job, experiment = f"{bucket}/submitted", f"vgim-cluster-{os.getpid()}", f"cluster-{os.getpid()}"
    sets = [*PIPELINE, f"run.dir={run_dir}", "run.steps=20", f"data.endpoint_url={s3_endpoint}",
            "tracking.enabled=true", f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": cluster.dashboard}
    submitted = subprocess.run(
        ["bash", str(checkout / "cluster/submit.sh"), f"--submission-id={job}", "--", "configs/smoke.yaml",
         *[a for s in sets for a in ("--set", s)]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert JobSubmissionClient(cluster.dashboard).get_job_status(job) == JobStatus.SUCCEEDED
    assert sorted(p.relative_to(checkout) for p in checkout.rglob("*")) == before   # nothing written back

    where = [descriptor(run_dir, s3_endpoint, f"stage-{s}") for s in (0, 1)]
    assert {w["node_id"] for w in where} == cluster.node_ids()   # one stage on each worker node
    assert_bitwise_equal(stored_state(run_dir, s3_endpoint), reference_state(tmp_path / "reference", 20))

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              "tags.vgim.stage != ''")
    tags = {r.data.tags["vgim.stage"]: r.data.tags for r in runs}
    assert sorted(tags) == ["0", "1"]
    for s, w in enumerate(where):
        assert tags[str(s)]["vgim.node_id"] == w["node_id"] and tags[str(s)]["vgim.node"] == w["node"]


def wait_for(what: str, condition, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended first:\n{proc.communicate()[1][-4000:]}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return value


@pytest.mark.slow
def test_node_lost_replaced_then_lost_for_good(cluster, bucket, s3_endpoint, tmp_path):
    run_dir, steps = f"{bucket}/elastic", 600     # long enough to outlast both losses on an idle machine
    sets = [*PIPELINE, f"run.dir={run_dir}", f"run.steps={steps}", "run.log_every=10",
            f"data.endpoint_url={s3_endpoint}", "pipeline.replan_after_s=3"]
    proc = subprocess.Popen([str(BIN / "vgim"), "train", "configs/smoke.yaml", "--address", cluster.address,
                             *[a for s in sets for a in ("--set", s)]], stderr=subprocess.PIPE, text=True)
    ckpt = CheckpointManager(run_dir, endpoint_url=s3_endpoint)

    def committed() -> int:
        ckpt.fs.invalidate_cache()
        return ckpt.latest() or 0

    def stage(s: int) -> dict:
        return descriptor(run_dir, s3_endpoint, f"stage-{s}") or {}

    try:
        def restarted_on(node: str) -> dict | None:
            """The descriptor of the stage on ``node`` once both stages restarted from the same checkpoint
            (which stage Ray puts on the fresh node is its choice)."""
            workers = [stage(0), stage(1)]
            if workers[0].get("start", 0) >= 40 and workers[0].get("start") == workers[1].get("start"):
                return next((w for w in workers if w.get("node_id") == node), None)
            return None

        # 1. Lose the node holding stage 1 and add a fresh one: the group restarts, one stage there.
        wait_for("a checkpoint at step 40", lambda: committed() >= 40, proc)
        lost = stage(1)["node_id"]
        cluster.remove(lost)
        t0 = time.monotonic()
        fresh = cluster.add().node_id
        moved = wait_for("a stage on the fresh node", lambda: restarted_on(fresh), proc)
        first_recovery = time.monotonic() - t0

        # 2. Lose it again, add nothing: after the grace period both stages share the node left.
        wait_for("a checkpoint after the restart", lambda: committed() >= moved["start"] + 20, proc)
        cluster.remove(fresh)
        t0 = time.monotonic()
        merged = wait_for("the re-planned single stage",
                          lambda: (w := stage(0)).get("modules") == [0, 1, 2, 3] and w, proc)
        second_recovery = time.monotonic() - t0
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, "\n".join(line for line in err.splitlines()
                                               if "RayTrainWorker" not in line and "Found multiple" not in line)[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        while len(cluster.node_ids()) < 2:   # leave the cluster as the fixture made it
            cluster.add()

    print(f"recovery: node replaced {first_recovery:.1f} s, re-planned {second_recovery:.1f} s")
    assert merged["start"] > moved["start"]
    fs, root = open_dir(run_dir, s3_endpoint)
    summary = json.loads(fs.cat_file(f"{root}/summary.json"))
    assert summary["steps"] == steps and summary["stages"] == [[0, 1, 2, 3]]
    assert [(r["step"], r["to"]["stages"]) for r in summary["replans"]] == [(merged["start"], [[0, 1, 2, 3]])]
    rows = [json.loads(line) for line in fs.cat_file(f"{root}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, steps + 1, 10))   # no step logged twice or lost
    assert_bitwise_equal(stored_state(run_dir, s3_endpoint), reference_state(tmp_path / "reference", steps))


@pytest.mark.slow
def test_data_prepare_on_the_cluster(cluster, bucket, s3_endpoint, librispeech_dir, tmp_path):
    # The head has no CPUs: every shard is built by a task on a worker node and written straight to S3.
    command = [str(BIN / "vgim"), "data", "prepare", str(librispeech_dir), "--format", "librispeech",
               "--shard-size", "4"]
    one = subprocess.run([*command, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    spread = subprocess.run([*command, "--out", f"{bucket}/shards", "--endpoint-url", s3_endpoint,
                             "--address", cluster.address], capture_output=True, text=True, timeout=300)
    assert spread.returncode == 0, spread.stderr[-3000:]
    assert re.search(r"^prepare: 5/5 shard \(\d+:\d\d elapsed, ETA 0:00\) - ", spread.stderr, re.M)  # per shard
    fs, root = open_dir(f"{bucket}/shards", s3_endpoint)
    assert json.loads(fs.cat_file(f"{root}/manifest.json")) == json.loads((tmp_path / "one/manifest.json").read_text())
    for name in sorted(p.name for p in (tmp_path / "one").glob("*.parquet")):
        assert fs.cat_file(f"{root}/{name}") == (tmp_path / "one" / name).read_bytes(), name


def test_fewer_workers_drops_replicas_then_merges_the_last_stages():
    from vgim_dist.pipeline.replan import fewer_workers

    four = [[0], [1], [2], [3]]
    assert fewer_workers(four, [2, 1, 1, 1], 5) == (four, [2, 1, 1, 1])
    assert fewer_workers(four, [2, 1, 1, 1], 4) == (four, [1, 1, 1, 1])
    assert fewer_workers(four, [2, 1, 1, 1], 3) == ([[0], [1], [2, 3]], [1, 1, 1])
    assert fewer_workers(four, [2, 1, 1, 1], 2) == ([[0], [1, 2, 3]], [1, 1])
    assert fewer_workers(four, [2, 1, 1, 1], 0) == ([[0, 1, 2, 3]], [1])
    assert fewer_workers([[0], [1, 2, 3]], [2, 2], 3) == ([[0], [1, 2, 3]], [1, 2])


def test_checkpoints_written_elsewhere_are_seen_on_s3(bucket, s3_endpoint):
    """The driver lists run.dir while workers on other nodes commit to it: a listing it made before must not
    hide a newer checkpoint (s3fs caches listings per filesystem instance)."""
    import s3fs

    from vgim_dist.train.checkpoint import MARKER

    ckpt = CheckpointManager(f"{bucket}/listing", endpoint_url=s3_endpoint)
    other = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    other.pipe(f"{ckpt.step_dir(10)}/{MARKER}", b"{}")
    assert ckpt.latest() == 10
    other.pipe(f"{ckpt.step_dir(20)}/{MARKER}", b"{}")   # a worker commits the next one
    assert ckpt.latest() == 20
