"""MLflow tracking against a real server, read back through its REST API: a parent run per job with one child
per stage, every logged step in every child, the config artifact, a registered encoder that gives the
checkpoint's features; resume into the same runs without duplicate steps; training that survives a store
that is down or hung; credentials kept out of every file and log; `vgim ui` over the embedded SQLite store."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests
import torch

from vgim_dist.config import load_config
from vgim_dist.launch import train
from vgim_dist.model import build_module, loss_terms
from vgim_dist.tracking import StageLogger, StageRef, stage_metrics
from vgim_dist.tracking.server import start_server, wait_ready
from vgim_dist.tracking.tracker import EXPERIMENT_KIND, RunTracker, flat_params
from vgim_dist.train.checkpoint import CheckpointManager

from helpers import FAST, free_port

MODEL = "vgim-test-encoder"


def cfg_for(run_dir, *extra):
    return load_config("configs/smoke.yaml",
                       [*FAST, "checkpoint.every=2", f"run.dir={run_dir}", "tracking.enabled=true", *extra])


def get(url: str, endpoint: str, **params) -> dict:
    r = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def post(url: str, endpoint: str, body: dict) -> dict:
    r = requests.post(f"{url}/api/2.0/mlflow/{endpoint}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def steps(url: str, run_id: str, key: str) -> list[int]:
    return [m["step"] for m in get(url, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]]


def children(url: str, parent: dict) -> list[dict]:
    found = post(url, "runs/search", {"experiment_ids": [parent["info"]["experiment_id"]],
                                      "filter": f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'"})
    return sorted(found.get("runs", []), key=lambda r: r["info"]["run_name"])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """A 4-step smoke run tracked on the server, its encoder registered."""
    run_dir = tmp_path_factory.mktemp("tracked")
    cfg = cfg_for(run_dir, "run.steps=4", f"tracking.uri={mlflow_server}", f"tracking.model_name={MODEL}",
                  "tracking.experiment=test-tracking", "data.endpoint_url=https://bob:hunter2@s3.example")
    summary = train(cfg)
    parent = get(mlflow_server, "runs/get", run_id=json.loads((run_dir / "mlflow.json").read_text())["parent_run_id"])
    return cfg, summary, parent["run"]


@pytest.mark.slow
def test_parent_has_config_environment_and_artifacts(mlflow_server, tracked):
    cfg, summary, parent = tracked
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["model.channels"] == "32" and params["seed"] == "0" and params["run.steps"] == "4"
    assert params["model.modules.1.layers.0.kernel"] == "4" and params["pipeline.stages"] == "[[0], [1, 2, 3]]"
    assert "data.endpoint_url" not in params      # a URL with a password is a credential
    t = tags(parent)
    assert t["topology.stages"] == "[[0], [1, 2, 3]]" and t["version.torch"] == torch.__version__.split("+")[0]
    assert parent["info"]["status"] == "FINISHED"
    files = {f["path"] for f in get(mlflow_server, "artifacts/list", run_id=parent["info"]["run_id"])["files"]}
    assert {"config.yaml", "summary.json", "curves"} <= files
    curves = get(mlflow_server, "artifacts/list", run_id=parent["info"]["run_id"], path="curves")["files"]
    assert sorted(f["path"] for f in curves) == [f"curves/module-{i}.png" for i in range(4)]
    r = requests.get(f"{mlflow_server}/get-artifact",
                     params={"path": "config.yaml", "run_uuid": parent["info"]["run_id"]}, timeout=30)
    r.raise_for_status()
    assert r.text.startswith("seed: 0") and "channels: 32" in r.text
    metrics = {m["key"]: m for m in parent["data"]["metrics"]}
    assert metrics["module.3.nce"]["step"] == 4 and metrics["module.3.nce"]["value"] == summary["final"]["module.3.nce"]
    # The whole curve, not one dot: the parent is the page a user lands on.
    rows = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    history = get(mlflow_server, "metrics/get-history", run_id=parent["info"]["run_id"], metric_key="module.0.nce")
    assert [(m["step"], m["value"]) for m in history["metrics"]] == [(r["step"], r["module.0.nce"]) for r in rows]
    assert len(rows) == 2


@pytest.mark.slow
def test_one_child_per_stage_with_every_logged_step(mlflow_server, tracked):
    cfg, _, parent = tracked
    runs = children(mlflow_server, parent)
    assert [json.loads(tags(r)["vgim.modules"]) for r in runs] == cfg.stage_modules()
    for run, modules in zip(runs, cfg.stage_modules()):
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in run["data"]["metrics"]}
        own = {f"module.{i}.{t}" for i in modules for t in loss_terms(cfg.model, i)}
        assert keys - {"step_time_s", "windows_per_s"} == own      # its own modules, nobody else's
        assert "module.3.kl" not in keys        # the GRU's KL is 0 by construction: not logged
        for key in [*own, "step_time_s", "windows_per_s"]:
            assert steps(mlflow_server, run_id, key) == [2, 4], key


@pytest.mark.slow
def test_registered_encoder_gives_the_checkpoint_features(mlflow_server, tracked):
    cfg, _, _ = tracked
    version = get(mlflow_server, "registered-models/alias", name=MODEL, alias="latest")["model_version"]
    mlflow.set_tracking_uri(mlflow_server)
    encoder = mlflow.pytorch.load_model(f"models:/{MODEL}/{version['version']}")
    ckpt = CheckpointManager(cfg.run.dir)
    x = torch.randn(3, 1, cfg.data.crop, generator=torch.Generator().manual_seed(0))
    h = x
    for i in range(len(cfg.model.modules)):
        m = build_module(cfg.model, i, cfg.seed)
        m.load_state_dict({k.removeprefix(f"module.{i}."): v for k, v in ckpt.load_weights(ckpt.latest(), i).items()})
        h = m.eval().encode(h)
    torch.testing.assert_close(encoder(x), h)


@pytest.mark.slow
def test_resume_logs_into_the_same_runs_without_duplicate_steps_and_vgim_ui_shows_it(tmp_path):
    """Embedded store (tracking.uri ''), then served by `vgim ui`."""
    train(cfg_for(tmp_path, "run.steps=4"))
    ids = (tmp_path / "mlflow.json").read_text()
    with pytest.raises(FileExistsError):
        train(cfg_for(tmp_path, "run.steps=8"))              # refused without --resume: no new runs
    assert (tmp_path / "mlflow.json").read_text() == ids
    train(cfg_for(tmp_path, "run.steps=8"), resume=True)
    assert (tmp_path / "mlflow.json").read_text() == ids
    # A stage restarted from an older checkpoint than it had logged (a Ray Train group restart) re-logs
    # steps; only the new one may reach the run.
    stage0 = json.loads(ids)["stages"][0]["run_id"]
    with StageLogger(StageRef(f"sqlite:///{tmp_path}/mlflow.db", stage0, 0, 10, 3, False)) as logger:
        logger.log(8, {"module.0.nce": 0.0})
        logger.log(10, {"module.0.nce": 1.0})

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "vgim_dist", "ui", str(tmp_path), "--port", str(port)],
                          stdout=subprocess.PIPE, text=True)
    try:
        wait_ready(ui, url, timeout=300)
        assert ui.stdout.readline().startswith(f"MLflow UI at {url}")
        parent = get(url, "runs/get", run_id=json.loads(ids)["parent_run_id"])["run"]
        assert {p["key"]: p["value"] for p in parent["data"]["params"]}["run.steps"] == "4"   # params are immutable
        assert tags(parent)["resume.run.steps"] == "8"
        runs = children(url, parent)
        assert len(runs) == 2 and all(r["info"]["status"] == "FINISHED" for r in runs)
        assert steps(url, stage0, "module.0.nce") == [2, 4, 6, 8, 10]
        assert steps(url, runs[1]["info"]["run_id"], "module.2.kl") == [2, 4, 6, 8]
        curves = get(url, "artifacts/list", run_id=parent["info"]["run_id"], path="curves")["files"]
        assert len(curves) == 4
    finally:
        ui.send_signal(signal.SIGINT)      # vgim ui stops its server on Ctrl-C
        assert ui.wait(timeout=30) == 0


@pytest.mark.slow
def test_a_store_that_is_down_does_not_stop_training(tmp_path, monkeypatch, caplog):
    from vgim_dist.tracking import logger as tracking_logger

    monkeypatch.setattr(tracking_logger, "CLOSE_GRACE_S", 2.0)   # how long a closing stage tries again
    down = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        summary = train(cfg_for(tmp_path, "run.steps=2", f"tracking.uri={down}"))
    assert summary["steps"] == 2
    assert any(f"tracking: cannot use {down}" in r.message for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        with StageLogger(StageRef(down, "0" * 32, 1, 1, 2, False)) as logger:
            logger.log(2, {"module.1.nce": 1.0})
            logger.log(4, {"module.1.nce": 1.0})
    assert logger.counters == {"sent": 0, "delayed": 0, "dropped": 2, "unanswered": 0}   # refused: never sent
    assert any(r.message.startswith("tracking: stage 1 sent 0 metric rows") and "dropped 2" in r.message
               for r in caplog.records)


def test_an_idle_sender_waits_instead_of_spinning(monkeypatch):
    """With nothing to send, a stage's sender thread sleeps between flush intervals. (It once spun after its
    first interval, and at batch 64 its spinning made the reference runner 3x slower.)"""
    import psutil

    from vgim_dist.tracking import logger as tracking_logger

    monkeypatch.setattr(tracking_logger, "FLUSH_S", 0.1)
    with StageLogger(StageRef(f"http://127.0.0.1:{free_port()}", "0" * 32, 1, 1, 1, False)) as sender:
        time.sleep(0.5)     # several flush intervals, with nothing logged
        tid = sender._thread.native_id

        def cpu_s() -> float:
            return next(t.user_time + t.system_time for t in psutil.Process().threads() if t.id == tid)

        before = cpu_s()
        time.sleep(2.0)
        used = cpu_s() - before
    assert used < 0.2, f"the idle sender used {used:.2f} s of CPU in 2 s"


@pytest.mark.slow
def test_rows_kept_through_an_outage_reach_the_run_once(mlflow_server, monkeypatch):
    client = mlflow.MlflowClient(mlflow_server)
    exp = (client.get_experiment_by_name("test-tracking")
           or client.get_experiment(client.create_experiment("test-tracking")))
    run_id = client.create_run(exp.experiment_id).info.run_id
    send, calls = mlflow.MlflowClient.log_batch, []

    def flaky(self, *args, **kwargs):   # the first flush fails on both tries, as with a locked SQLite file
        calls.append(1)
        if len(calls) <= 2:
            raise requests.ConnectionError("database is locked")
        return send(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
    logger = StageLogger(StageRef(mlflow_server, run_id, 0, 2, 2, False))
    for step in (1, 2):
        logger.log(step, {"x": float(step)})
    deadline = time.monotonic() + 30
    while len(calls) < 2 and time.monotonic() < deadline:   # the first batch has failed twice
        time.sleep(0.05)
    for step in (3, 4):
        logger.log(step, {"x": float(step)})
    logger.close()
    assert steps(mlflow_server, run_id, "x") == [1, 2, 3, 4] and not logger.pending
    assert logger.counters == {"sent": 4, "delayed": 2, "dropped": 0, "unanswered": 0}


@pytest.mark.slow
def test_a_hung_store_never_slows_training(tmp_path, monkeypatch, caplog):
    """The store accepts connections and never answers (its processes are SIGSTOPped) from the first step to
    the last: training keeps its pace, and once the store answers again every row arrives, once."""
    import psutil

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as out:
        server = start_server(f"sqlite:///{tmp_path}/mlflow.db", port, str(tmp_path / "artifacts"), out)
    tree = [server.pid]

    def signal_tree(sig):    # `mlflow server` serves from a child process
        for pid in tree:
            os.kill(pid, sig)

    try:
        wait_ready(server, url, timeout=300)
        tree += [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        original = RunTracker.start

        def start_then_hang(*args, **kwargs):    # the runs exist; then the server stops answering
            tracker = original(*args, **kwargs)
            signal_tree(signal.SIGSTOP)
            return tracker

        monkeypatch.setattr(RunTracker, "start", start_then_hang)
        run_dir, steps_total = tmp_path / "run", 40
        seen: dict[int, float] = {}

        def watch():             # metrics.jsonl is on disk at every logged step: when did each row land?
            while steps_total not in seen:
                path = run_dir / "metrics.jsonl"
                if path.exists():
                    for line in path.read_text().splitlines():
                        seen.setdefault(json.loads(line)["step"], time.monotonic())
                time.sleep(0.02)
            signal_tree(signal.SIGCONT)   # the last step is done: the store comes back

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with caplog.at_level(logging.WARNING):
            summary = train(cfg_for(run_dir, f"run.steps={steps_total}", "checkpoint.every=0",
                                    f"tracking.uri={url}", "tracking.flush_every=2", "tracking.retries=1"))
        watcher.join(timeout=5)
        ids = json.loads((run_dir / "mlflow.json").read_text())
        logged = {stage["run_id"]: steps(url, stage["run_id"], "step_time_s") for stage in ids["stages"]}
    finally:
        signal_tree(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)
    assert summary["steps"] == steps_total
    # Each request to the hung store waits 8 s. A flush on the training thread (every 2 logged steps) would
    # hold a step that long; in the background no gap between logged steps comes near it (on a loaded
    # 2-core machine they are 0.5-2 s apart).
    times = [seen[k] for k in sorted(seen)]
    assert max(b - a for a, b in zip(times, times[1:])) < 6.0, seen
    for stage in ids["stages"]:      # delayed, not lost: every logged step, once
        assert logged[stage["run_id"]] == list(range(2, steps_total + 1, 2))


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_written(mlflow_server, tmp_path, monkeypatch, caplog, capfd):
    """Basic-auth credentials in tracking.uri move to MLFLOW_TRACKING_USERNAME/PASSWORD: not in config.yaml
    (file and artifact), mlflow.json, params, tags or any log line."""
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    uri = mlflow_server.replace("http://", "http://bob:hunter2@")
    with caplog.at_level(logging.DEBUG, logger="vgim_dist"):
        train(cfg_for(tmp_path, "run.steps=2", f"tracking.uri={uri}", "tracking.experiment=test-secrets"))
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()]
    assert not written
    out, err = capfd.readouterr()
    assert "hunter2" not in out + err and not [r for r in caplog.records if "hunter2" in r.getMessage()]
    ids = json.loads((tmp_path / "mlflow.json").read_text())
    assert ids["tracking_uri"] == mlflow_server
    # Where to look, in the UI's training view, without the password.
    page = f"{mlflow_server}/#/experiments/{ids['experiment_id']}/runs/{ids['parent_run_id']}"
    page += "?workflowType=machine_learning"
    assert f"tracking: see it at {page}" in [r.getMessage() for r in caplog.records]
    parent = get(mlflow_server, "runs/get", run_id=ids["parent_run_id"])["run"]
    assert "hunter2" not in json.dumps(parent)
    r = requests.get(f"{mlflow_server}/get-artifact", params={"path": "config.yaml", "run_uuid": ids["parent_run_id"]},
                     timeout=30)
    assert r.ok and "tracking" in r.text and "hunter2" not in r.text


@pytest.mark.slow
def test_run_names_and_the_experiment_open_on_training_runs(mlflow_server, tracked):
    cfg, _, parent = tracked
    assert parent["info"]["run_name"] == "smoke V-GIM s0 reference 4 steps on noise"
    assert [r["info"]["run_name"] for r in children(mlflow_server, parent)] == ["stage-0 (M0)", "stage-1 (M1-M3)"]
    exp = get(mlflow_server, "experiments/get", experiment_id=parent["info"]["experiment_id"])["experiment"]
    assert EXPERIMENT_KIND.items() <= {t["key"]: t["value"] for t in exp.get("tags", [])}.items()


@pytest.mark.slow
def test_vgim_ui_refuses_a_taken_port_and_stops_its_server_on_sigterm(tmp_path):
    import psutil

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "vgim_dist", "ui", "--uri", f"sqlite:///{tmp_path}/m.db",
                              "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip() == (f"vgim: port {port} is taken (127.0.0.1:{port}); stop what uses it, or pass "
                                  "--port N (--port 0: any free port)")

    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "vgim_dist", "ui", "--uri", f"sqlite:///{tmp_path}/m.db",
                           "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        wait_ready(ui, f"http://127.0.0.1:{port}", timeout=300)
        server = psutil.Process(ui.pid).children(recursive=True)
        assert server
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(server, timeout=15)
        assert not alive, alive
    finally:
        if ui.poll() is None:
            ui.kill()


def test_params_drop_credentials_and_fit_mlflow_limits():
    tree = {"data": {"uri": "s3://bucket/shards", "aws_secret_access_key": "x", "api_token": "y",
                     "endpoint_url": "http://u:p@host:9000"},
            "model": {"modules": [{"layers": [{"kernel": 10}]}, {"autoregressor": 256}]},
            "pipeline": {"stages": [[0], [1]]}, "note": "z" * 7000, "flag": True}
    p = flat_params(tree)
    assert p == {"data.uri": "s3://bucket/shards", "model.modules.0.layers.0.kernel": "10",
                 "model.modules.1.autoregressor": "256", "pipeline.stages": "[[0], [1]]",
                 "note": "z" * 5997 + "...", "flag": "true"}


def test_stage_metrics_split_a_row_by_module():
    row = {"step": 4, "module.0.nce": 1.0, "module.1.nce": 2.0, "module.12.nce": 3.0, "step_time_s": 0.1}
    assert stage_metrics(row, [1]) == {"module.1.nce": 2.0, "step_time_s": 0.1}
    assert stage_metrics(row, [0, 12]) == {"module.0.nce": 1.0, "module.12.nce": 3.0, "step_time_s": 0.1}


def test_disabled_tracking_touches_nothing(tmp_path):
    cfg = load_config("configs/smoke.yaml", [f"run.dir={tmp_path}", "tracking.enabled=false"])
    tracker = RunTracker.start(cfg)
    assert not tracker.enabled and tracker.stage_ref(0) is None
    logger = StageLogger(None)
    logger.log(1, {"x": 1.0})
    logger.close()
    tracker.finish({}, [], lambda: None)
    assert list(tmp_path.iterdir()) == []
    # The reference runner imports the tracking package always; mlflow itself only when tracking is on.
    probe = "import sys, vgim_dist.launch; assert 'mlflow' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
