"""Where evaluation results go: ``<run.dir>/eval/`` always, and MLflow when the training run was tracked.

An evaluation becomes its own MLflow run, nested under the training job's parent run (the ids in
``<run.dir>/mlflow.json``), so the UI lists probes, decoders and reports beneath the run they evaluate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vgim_dist.run_dir import RunDir

log = logging.getLogger(__name__)


def eval_dir(run_dir: str) -> Path:
    """``<run_dir>/eval``, created."""
    d = RunDir.local_path(run_dir, RunDir.EVAL)
    d.mkdir(parents=True, exist_ok=True)
    return d


def log_evaluation(run_dir: str, name: str, metrics: dict[str, float], artifacts: list[str | Path]) -> str | None:
    """Log one evaluation (``name``, e.g. ``probe-syllables``) as an MLflow run linked to the training run of
    ``run_dir``: metrics, and each artifact file or folder. Returns the MLflow run id, or None when the training
    run was not tracked (no ``mlflow.json``) or the store cannot be reached; the results on disk are complete
    either way, so a failure here is a warning."""
    ids_file = Path(RunDir(str(run_dir)).tracking_ids)
    if not ids_file.is_file():
        log.info("%s: not logged to MLflow (no %s; train with tracking.enabled=true)", name, ids_file)
        return None
    try:
        ids = json.loads(ids_file.read_text())
        return _log(ids, run_dir, name, metrics, artifacts)
    except Exception as e:  # noqa: BLE001 - the store being down must not lose a finished evaluation
        log.warning("%s: could not log to MLflow (%s); the results are in %s", name, e, eval_dir(run_dir))
        return None


def _log(ids: dict, run_dir: str, name: str, metrics: dict[str, float], artifacts: list[str | Path]) -> str:
    import time  # noqa: PLC0415

    from mlflow.entities import Metric  # noqa: PLC0415

    from vgim_dist.tracking.logger import client  # noqa: PLC0415 - mlflow only when a run was tracked

    c = client(ids["tracking_uri"])
    parent = ids["parent_run_id"]
    run_id = c.create_run(ids["experiment_id"], run_name=name, tags={
        "mlflow.parentRunId": parent, "vgim.evaluates": parent, "vgim.eval": name,
        "vgim.run_dir": str(run_dir), "mlflow.source.name": f"vgim eval {name}"}).info.run_id
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):  # MLflow's log_batch limit
        c.log_batch(run_id, metrics=items[i:i + 1000])
    for a in map(Path, artifacts):
        if a.is_dir():
            c.log_artifacts(run_id, str(a), a.name)
        else:
            c.log_artifact(run_id, str(a))
    c.set_terminated(run_id, "FINISHED")
    log.info("%s: logged to MLflow run %s (under training run %s)", name, run_id, parent)
    return run_id
