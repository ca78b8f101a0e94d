"""The background evaluator: probe curves from step 0 while training, in another process, never in the way."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from vgim_dist.cli import main as data_main
from vgim_dist.config import dump_config, load_config
from vgim_dist.eval.monitor import ProbeMonitor
from vgim_dist.launch import train
from vgim_dist.train.reference import ReferenceRunner


@pytest.fixture(scope="module")
def shards(deboer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("monitor")
    words, syllables = str(root / "words"), str(root / "syllables")
    assert data_main(["data", "prepare", str(deboer_dir), "--format", "deboer", "--out", words]) == 0
    assert data_main(["data", "prepare", str(deboer_dir), "--format", "deboer", "--level", "syllable",
                      "--syllable-split", "clean", "--out", syllables]) == 0
    return {"words": words, "syllables": syllables}


def _cfg(shards: dict, run: Path, *extra: str):
    return load_config("configs/smoke.yaml", [
        f"run.dir={run}", f"data.uri={shards['words']}", "data.batch_size=4", "run.steps=12", "run.log_every=2",
        "run.threads=1", "checkpoint.every=4", "eval.every=1", f"eval.data={shards['syllables']}",
        "eval.epochs=3", "tracking.system_metrics=false", *extra])


@pytest.mark.slow
def test_curve_has_a_point_per_evaluated_checkpoint_in_metrics_and_mlflow(shards, tmp_path, caplog):
    run = tmp_path / "run"
    train(_cfg(shards, run, "tracking.enabled=true", "eval.tasks=[vowels]"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probed = sorted(r["step"] for r in rows if "probe.vowels.module.0" in r)
    # Step 0, then every committed checkpoint (4, 8, 12) that a busy evaluator did not have to skip.
    skipped = re.search(r"skipped \d+ checkpoints while behind: steps \[([\d, ]*)\]", caplog.text)
    skipped = {int(s) for s in skipped.group(1).split(",")} if skipped else set()
    assert probed[0] == 0 and probed[-1] == 12 and set(probed) == {0, 4, 8, 12} - skipped
    probe_keys = {"step", *(f"probe.vowels.module.{i}" for i in range(4))}
    assert all(set(r) == probe_keys for r in rows if "probe.vowels.module.0" in r)
    assert all(0 <= r[k] <= 1 for r in rows for k in r if k.startswith("probe."))

    from mlflow import MlflowClient

    ids = json.loads((run / "mlflow.json").read_text())
    history = MlflowClient(ids["tracking_uri"]).get_metric_history(ids["parent_run_id"], "probe.vowels.module.3")
    assert sorted(m.step for m in history) == probed


@pytest.mark.slow
def test_a_slow_evaluator_skips_checkpoints_and_says_so(shards, tmp_path, caplog):
    """Checkpoints every step and 200 probe epochs: the evaluator falls behind. The trainer never waits (each
    call returns at once), at most one step waits, the skipped ones are logged, the curve still starts at 0."""
    cfg = _cfg(shards, tmp_path / "run", "checkpoint.every=1", "eval.epochs=200", "eval.tasks=[syllables]")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))  # what the evaluator rebuilds the encoder from
    monitor = ProbeMonitor(cfg)
    runner = ReferenceRunner(cfg, "cpu", monitor=monitor)  # starts it
    calls = []
    committed = monitor.committed

    def timed(step: int) -> None:
        t = time.perf_counter()
        committed(step)
        calls.append(time.perf_counter() - t)
        assert monitor.waiting is None or monitor.busy is not None  # one in flight, at most one waiting

    monitor.committed = timed
    runner.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probed = sorted(r["step"] for r in rows if "probe.syllables.module.0" in r)
    assert probed[0] == 0 and monitor.skipped and not set(probed) & set(monitor.skipped)
    assert len(calls) == 12 and max(calls) < 0.5
    assert "evaluator: behind training, skipping the probe of step" in caplog.text


def test_the_evaluator_is_another_process_at_lower_priority(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "run")
    from vgim_dist.train.metrics import MetricsLog

    monitor = ProbeMonitor(cfg).start("subprocess", MetricsLog(str(tmp_path / "run"), 12))
    try:
        proc = monitor._backend.proc
        deadline = time.monotonic() + 60
        while os.sched_getscheduler(proc.pid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.1)  # it lowers its own priority as it starts
        # Linux's idle class: it runs only on CPU time the trainer leaves
        assert proc.pid != os.getpid() and os.sched_getscheduler(proc.pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) != os.SCHED_IDLE          # the trainer keeps its own priority
    finally:
        monitor._backend.stop()


def test_probe_rows_keep_metrics_in_step_order(tmp_path):
    """A probe result arrives after later training rows; it goes in at its step, before that step's training
    row, so the last row stays the last training step's (the run summary's "final")."""
    from vgim_dist.train.metrics import MetricsLog

    log = MetricsLog(str(tmp_path), 12, stream=open(os.devnull, "w"))
    for step in (4, 8, 12):
        log.record(step, {"module.0.nce": 1.0})
    log.add(0, {"probe.vowels.module.0": 0.4})
    log.add(12, {"probe.vowels.module.0": 0.5})
    assert [r["step"] for r in log.rows] == [0, 4, 8, 12, 12]
    assert "module.0.nce" in log.rows[-1]
