"""A tracking server that is still hung (its processes SIGSTOPped: connections accepted, nothing answered) when
training ends. Within the grace (`CLOSE_GRACE_S`) every row reaches MLflow and the end-of-run line says so;
past it, the line says what was acknowledged and what went unanswered, and the runs stay RUNNING until a
`--resume` ends them; a stage run that lacks a logged step never ends FINISHED."""

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time

import psutil
import pytest
import requests

from vgim_dist.launch import train
from vgim_dist.tracking import StageLogger, logger as tracking_logger
from vgim_dist.tracking.server import start_server, wait_ready
from vgim_dist.tracking.tracker import MISSING_STEPS_TAG

from helpers import cfg_for as smoke_cfg, free_port

STEPS, FREEZE_AT = 20, 6
LOGGED = list(range(2, STEPS + 1, 2))            # run.log_every=2 (helpers.FAST)
ACCOUNT = re.compile(r"tracking: stage (\d) sent (\d+) metric rows to \S+, (\d+) of them late, and dropped (\d+)"
                     r"(?:; (\d+) more were sent but not acknowledged)?")


def get(url: str, endpoint: str, **params) -> dict:
    r = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def held(url: str, run_id: str) -> list[int]:
    history = get(url, "metrics/get-history", run_id=run_id, metric_key="step_time_s").get("metrics", [])
    return sorted(m["step"] for m in history)


def run_info(url: str, run_id: str) -> tuple[str, dict[str, str]]:
    run = get(url, "runs/get", run_id=run_id)["run"]
    return run["info"]["status"], {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def accounts(caplog) -> dict[int, tuple[int, int, int, int]]:
    """stage -> (sent, late, dropped, unanswered), from each stage's end-of-run line."""
    found = {}
    for r in caplog.records:
        if m := ACCOUNT.match(r.getMessage()):
            found[int(m[1])] = (int(m[2]), int(m[3]), int(m[4]), int(m[5] or 0))
    return found


@contextlib.contextmanager
def private_server(tmp_path):
    """A server of this test's own (the session's is shared), and a function that signals its process tree."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as out:
        server = start_server(f"sqlite:///{tmp_path}/mlflow.db", port, str(tmp_path / "artifacts"), out)
    tree = [server.pid]

    def signal_tree(sig):     # `mlflow server` serves from child processes
        for pid in tree:
            os.kill(pid, sig)

    try:
        wait_ready(server, url, timeout=300)
        tree += [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        yield url, signal_tree
    finally:
        signal_tree(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)


def freeze_during(run_dir, signal_tree, thaw_after_s: float | None) -> threading.Thread:
    """SIGSTOP the server once metrics.jsonl holds step FREEZE_AT; SIGCONT ``thaw_after_s`` after it holds
    the last step (None: never, the test continues it)."""
    def watch():
        path, frozen = run_dir / "metrics.jsonl", False
        while True:
            logged = [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
            if not frozen and logged and logged[-1] >= FREEZE_AT:
                signal_tree(signal.SIGSTOP)
                frozen = True
            if logged and logged[-1] >= STEPS:
                break
            time.sleep(0.02)
        if thaw_after_s is not None:
            time.sleep(thaw_after_s)
            signal_tree(signal.SIGCONT)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def cfg_for(run_dir, url, *extra):
    return smoke_cfg(run_dir, f"run.steps={STEPS}", "checkpoint.every=0", "tracking.enabled=true",
                     f"tracking.uri={url}", "tracking.flush_every=2", "tracking.retries=1",
                     "tracking.system_metrics=false", *extra)


@pytest.mark.slow
def test_a_store_hung_when_training_ends_gets_every_row_within_the_grace(tmp_path, monkeypatch, caplog):
    """The store stops answering at step 6 and comes back 4 s after the last step, well inside the grace:
    every row of every stage is in MLflow, each stage's line counts exactly those rows as sent, and the runs
    end FINISHED. (Before, a stage gave up after one request timeout plus backoff: its line said `dropped`
    for rows the store then applied, and rows its sender still held were lost when the process ended.)"""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking_logger, "CLOSE_GRACE_S", 30.0)
    run_dir = tmp_path / "run"
    with private_server(tmp_path) as (url, signal_tree):
        watcher = freeze_during(run_dir, signal_tree, thaw_after_s=4.0)
        with caplog.at_level(logging.INFO, logger="vgim_dist"):
            train(cfg_for(run_dir, url))
        watcher.join(timeout=30)
        ids = json.loads((run_dir / "mlflow.json").read_text())
        stages = [s["run_id"] for s in ids["stages"]]
        holds = {s: held(url, run_id) for s, run_id in enumerate(stages)}
        states = [run_info(url, run_id) for run_id in [*stages, ids["parent_run_id"]]]
    counts = accounts(caplog)
    assert any(re.match(r"tracking: stage \d keeps trying .* for up to 30 s", r.getMessage())
               for r in caplog.records)      # the store was still hung when training ended
    for s in range(len(stages)):
        assert holds[s] == LOGGED, s
        sent, late, dropped, unanswered = counts[s]
        assert (sent, dropped, unanswered) == (len(holds[s]), 0, 0), counts
        assert late > 0, counts            # some rows did wait for the store
    assert [status for status, _ in states] == ["FINISHED"] * len(states)
    assert not any(MISSING_STEPS_TAG in tags for _, tags in states)


@pytest.mark.slow
def test_a_store_hung_past_the_grace_is_reported_as_it_is_and_stays_running_until_resume(tmp_path, monkeypatch,
                                                                                         caplog):
    """The store is still hung when the grace ends, and through the end of the job: each stage's line counts
    as sent only rows MLflow holds, and every other row as unanswered (the store may apply those requests when
    it wakes) or dropped; the runs stay RUNNING. A `--resume` with the store back ends them: FINISHED where
    MLflow holds every logged step, FAILED and tagged with the missing steps where it does not."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking_logger, "CLOSE_GRACE_S", 2.0)
    run_dir = tmp_path / "run"
    with private_server(tmp_path) as (url, signal_tree):
        watcher = freeze_during(run_dir, signal_tree, thaw_after_s=None)
        with caplog.at_level(logging.INFO, logger="vgim_dist"):
            train(cfg_for(run_dir, url))
        watcher.join(timeout=30)
        signal_tree(signal.SIGCONT)
        ids = json.loads((run_dir / "mlflow.json").read_text())
        stages = [s["run_id"] for s in ids["stages"]]
        wait_ready_again(url, stages)
        holds = {s: held(url, run_id) for s, run_id in enumerate(stages)}
        running = [run_info(url, run_id)[0] for run_id in [*stages, ids["parent_run_id"]]]

        counts = accounts(caplog)
        for s in range(len(stages)):
            sent, late, dropped, unanswered = counts[s]
            assert sent + dropped + unanswered == len(LOGGED) and sent < len(LOGGED), counts
            # What was acknowledged is there; what went unanswered may be; what was dropped (never sent) is not.
            assert set(LOGGED[:sent]) <= set(holds[s]) and sent <= len(holds[s]) <= sent + unanswered, (holds, counts)
        assert running == ["RUNNING"] * len(running)

        train(cfg_for(run_dir, url), resume=True)        # the store answers: the runs are ended
        for s, run_id in enumerate(stages):
            status, tags = run_info(url, run_id)
            missing = [k for k in LOGGED if k not in holds[s]]
            assert (status, tags.get(MISSING_STEPS_TAG)) == (
                ("FINISHED", None) if not missing else ("FAILED", ",".join(map(str, missing)))), (s, holds)
        assert run_info(url, ids["parent_run_id"])[0] == "FINISHED"


def wait_ready_again(url: str, run_ids: list[str], quiet_s: float = 3.0, timeout: float = 60.0) -> None:
    """Until the continued server answers and has applied the requests it held: what the runs hold has not
    changed for ``quiet_s``."""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            now = [held(url, run_id) for run_id in run_ids]
        except requests.RequestException:
            now = None
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not settle in {timeout:.0f} s")


@pytest.mark.slow
def test_a_stage_run_that_lacks_a_logged_step_never_ends_finished(mlflow_server, tmp_path, monkeypatch, caplog):
    """A row that never reaches MLflow (here stage 0's step 4, dropped before its queue) leaves that stage's run
    FAILED with the tag vgim.missing_steps naming the step; the complete runs end FINISHED."""
    log = StageLogger.log

    def lossy(self, step, values):
        if not (self.ref and self.ref.stage == 0 and step == 4):
            log(self, step, values)

    monkeypatch.setattr(StageLogger, "log", lossy)
    with caplog.at_level(logging.WARNING, logger="vgim_dist"):
        train(smoke_cfg(tmp_path, "run.steps=6", "checkpoint.every=0", "tracking.enabled=true",
                        f"tracking.uri={mlflow_server}", "tracking.experiment=test-outage",
                        "tracking.system_metrics=false"))
    ids = json.loads((tmp_path / "mlflow.json").read_text())
    stage0, stage1 = (s["run_id"] for s in ids["stages"])
    assert held(mlflow_server, stage0) == [2, 6]
    status, tags = run_info(mlflow_server, stage0)
    assert (status, tags[MISSING_STEPS_TAG]) == ("FAILED", "4")
    assert run_info(mlflow_server, stage1)[0] == run_info(mlflow_server, ids["parent_run_id"])[0] == "FINISHED"
    assert ("tracking: the run of stage 0 holds 2 of the 3 logged steps (missing 4); it ends FAILED with the tag "
            "vgim.missing_steps; metrics.jsonl has every row") in [r.getMessage() for r in caplog.records]
