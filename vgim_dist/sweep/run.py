"""``vgim sweep``: the trials of a sweep file on Ray Tune, each an ordinary vgim run (docs/sweeps.md).

    <dir>/sweep.json               the sweep file as resolved, and its trials (names, params, configs)
    <dir>/trials/<name>/           each trial's run directory (config.yaml, checkpoints/, eval/, ...)
    <dir>/trials/<name>/trial.json the trial's end: FINISHED with its metrics, FAILED with its error, or
                                   STOPPED by early stopping
    <dir>/tune/                    Ray Tune's experiment state, from which --resume restores
    <dir>/summary.json, summary.md every trial's status and metrics, ranked by the sweep's metric
    <dir>/mlflow.json              the sweep's MLflow run, under which each trial's run nests

A trial that Tune starts again (after ``--resume``, or a retry) is a ``vgim train --resume`` of its run
directory, so it continues from its last checkpoint; a trial that had finished reports its stored result.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

from vgim_dist.config import to_dict
from vgim_dist.errors import UserError
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import absolute_uri
from vgim_dist.sweep.spec import EvalSpec, SweepFile, Trial, plan, trial_config

log = logging.getLogger(__name__)

SCORE = "score"          # the metric Tune ranks by: the sweep's metric.eval / metric.module accuracy


def one_line(e: BaseException) -> str:
    """A trial's error as one line: ours (they name the key or file) as they are, others with their type."""
    from vgim_dist.config import ConfigError  # noqa: PLC0415

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    ours = (UserError, ConfigError, FileNotFoundError, Diverged)
    return text if isinstance(e, ours) else f"{type(e).__name__}: {text}"


# --------------------------------------------------------------------------------------------- a trial


def evaluate(run_dir: str, evals: list[EvalSpec], metric: dict, track: bool) -> dict[str, float]:
    """The probes a trial ends with; ``<probe result>.m<module>`` accuracies, and the score."""
    from vgim_dist.eval.probes import ProbeSettings, probe_run, result_name  # noqa: PLC0415

    metrics: dict[str, float] = {}
    for i, e in enumerate(evals):
        settings = ProbeSettings(epochs=e.epochs, lr=e.lr, batch_size=e.batch_size, standardize=e.standardize,
                                 features=e.features, pool=e.pool, bias=e.bias, split=e.split)
        r = probe_run(run_dir, e.task, e.data, repeats=e.repeats, settings=settings, seed=e.seed, track=track,
                      baseline=e.baseline)
        name = result_name(e.task, e.data, "mean", settings)
        modules = sorted(r["modules"], key=int)
        for m in modules:
            metrics[f"{name}.m{m}"] = r["modules"][m]["accuracy"]["mean"]
        if i == metric["eval"]:
            metrics[SCORE] = r["modules"][modules[metric["module"]]]["accuracy"]["mean"]
    return metrics


def run_trial(config: dict) -> None:
    """One trial, in its Ray Tune worker: train (or resume) its run, probe it, report. Its end is written to
    ``trial.json`` before Tune hears of it, so a sweep's results never depend on Tune's own state."""
    from ray import tune  # noqa: PLC0415

    from vgim_dist.launch import train  # noqa: PLC0415

    started = time.time()
    t = _trial(config)
    cfg = trial_config(t["config"])
    run_dir = RunDir.of(cfg)
    record = run_dir.path(RunDir.TRIAL)
    if run_dir.exists(record) and (done := json.loads(run_dir.read(record)))["status"] in ("FINISHED", "STOPPED"):
        tune.report(done["metrics"])   # ended before the driver stopped: not run again
        return
    stopping, curve = t["stopping"], {}
    try:
        if not run_dir.exists(run_dir.summary):
            if stopping["scheduler"] == "none":
                train(cfg, resume=run_dir.exists(run_dir.config))
            else:
                curve = train_reporting(cfg, stopping, lambda: train(cfg, resume=run_dir.exists(run_dir.config)))
        check_finite(json.loads(run_dir.read(run_dir.summary)))
        evals = [EvalSpec(**e) for e in t["eval"]]
        metrics = evaluate(cfg.run.dir, evals, t["metric"], cfg.tracking.enabled) if evals else {}
    except StoppedEarly as e:   # its training thread ends with this process, which Tune ends now
        write_record(run_dir, t, "STOPPED", started, metrics=e.point, error=str(e))
        raise SystemExit(0) from None
    except BaseException as e:
        write_record(run_dir, t, "FAILED", started, error=one_line(e))
        raise
    write_record(run_dir, t, "FINISHED", started, metrics=metrics)
    tune.report((metrics or {"steps": cfg.run.steps}) | curve)


class Diverged(ValueError):
    """A trial whose losses ended NaN or infinite: FAILED, not ranked (training itself does not stop on it)."""


def check_finite(summary: dict) -> None:
    final = summary.get("final", {})
    bad = [k for k, v in final.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise Diverged(f"{', '.join(bad)} = {final[bad[0]]} at step {final.get('step')}; lower optim.lr, or "
                       "set optim.grad_clip")


class StoppedEarly(Exception):
    """Tune's scheduler ended the trial at a point of its probe curve (``point``: probe, step)."""

    def __init__(self, point: dict):
        super().__init__(f"stopped early at step {point.get('step')}")
        self.point = point


def train_reporting(cfg: Any, stopping: dict, run: Any) -> dict:
    """``run()`` (the training) in a helper thread, while this one reports each new point of the background
    evaluator's probe curve to Tune, whose scheduler may end the trial at any of them. The last point."""
    import threading  # noqa: PLC0415

    from ray import tune  # noqa: PLC0415

    from vgim_dist.train.metrics import MetricsLog  # noqa: PLC0415

    key = f"probe.{stopping['task']}.module.{range(len(cfg.model.modules))[stopping['module']]}"
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - raised again in the trial's thread
            failure.append(e)

    worker = threading.Thread(target=target, name="vgim-train", daemon=True)
    worker.start()
    seen, last = set(), {}
    while True:
        alive = worker.is_alive()
        log_ = MetricsLog(RunDir.of(cfg), cfg.run.steps)
        log_.resume(cfg.run.steps)
        for row in log_.rows:
            if key in row and row["step"] not in seen:
                seen.add(row["step"])
                last = {"probe": row[key], "step": row["step"]}
                try:
                    tune.report(last)
                except SystemExit:   # how Tune's session ends a trial that its scheduler stops
                    raise StoppedEarly(last) from None
        if not alive:
            break
        time.sleep(1.0)
    if failure:
        raise failure[0]
    return last


def write_record(run_dir: RunDir, t: dict, status: str, started: float, metrics: dict | None = None,
                 error: str = "") -> None:
    """``trial.json``; ``started`` and ``ended`` (Unix seconds) bound the trial's own work, so the time a
    sweep spends outside its trials (Ray, Tune) is what is left (benchmarks/sweep.py)."""
    run_dir.write(run_dir.path(RunDir.TRIAL), json.dumps(
        {"name": t["name"], "params": t["params"], "status": status, "metrics": metrics or {}, "error": error,
         "started": started, "ended": time.time()}, indent=1).encode())


@functools.cache
def _record(root: str, endpoint_url: str) -> dict:
    return json.loads(RunDir(root, endpoint_url).read(f"{RunDir(root, endpoint_url).root}/{RunDir.SWEEP}"))


def _trial(config: dict) -> dict:
    """A trial's name, values, config, resources and the sweep's probes, from ``sweep.json``: Tune's own
    config for a trial holds only its name (short trial tables, small experiment state)."""
    record = _record(config["sweep"], config["endpoint_url"])
    t = next(t for t in record["trials"] if t["name"] == config["trial"])
    return t | {"eval": record["eval"], "metric": record["metric"], "stopping": record["sweep"]["stopping"]}


def _resources(config: dict) -> Any:
    from ray.tune import PlacementGroupFactory  # noqa: PLC0415

    return PlacementGroupFactory(_trial(config)["bundles"])


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]


# --------------------------------------------------------------------------------------------- the driver


def run_sweep(s: SweepFile, path: str, address: str = "", resume: bool = False) -> list[dict]:
    """Run every trial of ``s`` (``path``: the sweep file, for messages) and return their records, ranked."""
    from ray import tune  # noqa: PLC0415

    from vgim_dist.ray_session import connect  # noqa: PLC0415

    root = absolute_uri(s.dir)
    trials = plan(s, path)
    sweep_dir = RunDir(root, trial_config(trials[0].config).data.endpoint_url if trials else "")
    sweep_file = sweep_dir.path(RunDir.SWEEP)
    if resume and not sweep_dir.exists(sweep_file):
        raise FileNotFoundError(f"--resume: {root} holds no sweep (no sweep.json); drop --resume to start it")
    if not resume and sweep_dir.exists(sweep_file):
        raise FileExistsError(f"{root} already holds a sweep (sweep.json); pass --resume to continue it, or "
                              "choose another dir")
    if resume:
        before = [t["name"] for t in json.loads(sweep_dir.read(sweep_file))["trials"]]
        if before != [t.name for t in trials]:
            raise UserError(f"{path}: its trials differ from those of the sweep in {root}", "--resume",
                            "resume with the sweep file it started with, or choose another dir")
    tracking = SweepTracking.open(s, trials, root, resume)
    trials = plan(s, path, tracking.overrides()) if tracking.enabled else trials
    evals = [asdict(e) | {"data": absolute_uri(e.data)} for e in s.eval]
    sweep_dir.write(sweep_file, json.dumps({"sweep": to_dict(s), "file": str(path), "eval": evals,
                                            "metric": asdict(s.metric), "trials": [t.to_dict() for t in trials]},
                                           indent=1).encode())
    space = {"sweep": root, "endpoint_url": sweep_dir.endpoint_url, "trial": tune.grid_search([t.name for t in trials])}

    # A trial whose evaluator has not probed yet reports no `probe` point: not an error of the sweep.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    started = connect(address)
    try:
        trainable = tune.with_resources(run_trial, _resources)
        fs = None if sweep_dir.local else _pyarrow_fs(sweep_dir)
        storage = root if sweep_dir.local else sweep_dir.root
        if resume and tune.Tuner.can_restore(f"{storage}/tune", fs):
            tuner = tune.Tuner.restore(f"{storage}/tune", trainable, resume_errored=True, storage_filesystem=fs)
        else:
            tuner = tune.Tuner(
                trainable, param_space=space,
                # A fresh worker process per trial (reuse_actors off): reused, the second trial's torch.export of
                # its encoder (tracking) crashed the worker with torch 2.11 (a segfault in fake-tensor mode).
                tune_config=tune.TuneConfig(max_concurrent_trials=s.concurrency or None, trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_name, reuse_actors=False,
                                            scheduler=scheduler(s, trial_config(trials[0].config).run.steps)),
                run_config=tune.RunConfig(name="tune", storage_path=storage, storage_filesystem=fs,
                                          failure_config=tune.FailureConfig(max_failures=s.retries), verbose=1))
        grid = tuner.fit()
    finally:
        if started:
            import ray  # noqa: PLC0415

            ray.shutdown()
    tune_errors = {r.config["trial"]: one_line(r.error) for r in grid if r.error and r.config}
    stopped = {r.config["trial"] for r in grid if not r.error and r.config}   # those without trial.json
    rows = summarize(sweep_dir, trials, tune_errors, stopped)
    tracking.finish(rows, sweep_dir)
    return rows


def scheduler(s: SweepFile, steps: int) -> Any:
    """Tune's early stopping on the reported probe curve, or None (the default: every trial to run.steps)."""
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule  # noqa: PLC0415

    stop = s.stopping
    if stop.scheduler == "asha":
        # max_t past the last step: reaching it is finishing, which the trial does itself (probes included).
        return ASHAScheduler(time_attr="step", metric="probe", mode="max", max_t=steps + 1,
                             grace_period=max(stop.grace, 1))
    if stop.scheduler == "median":
        return MedianStoppingRule(time_attr="step", metric="probe", mode="max", grace_period=stop.grace)
    return None


def _pyarrow_fs(run_dir: RunDir) -> Any:
    """The sweep directory's fsspec filesystem (its S3 endpoint included) as Tune's storage."""
    import pyarrow.fs  # noqa: PLC0415

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(run_dir.fs))


def summarize(sweep_dir: RunDir, trials: list[Trial], tune_errors: dict[str, str],
              stopped: set[str] = frozenset()) -> list[dict]:
    """Every trial's record (FAILED with Tune's error where the trial left none, e.g. a killed worker; STOPPED
    where early stopping ended it), best score first; written as summary.json and summary.md."""
    rows = []
    for t in trials:
        record = f"{sweep_dir.root}/trials/{t.name}/{RunDir.TRIAL}"
        if sweep_dir.fs.exists(record):
            row = json.loads(sweep_dir.fs.cat_file(record))
        else:
            status = "FAILED" if t.name in tune_errors else "STOPPED" if t.name in stopped else "NOT RUN"
            row = {"name": t.name, "params": t.params, "status": status, "metrics": {},
                   "error": tune_errors.get(t.name, "")}
        rows.append(row)
    rows.sort(key=lambda r: -r["metrics"].get(SCORE, float("-inf")))
    sweep_dir.write(sweep_dir.path("summary.json"), json.dumps(rows, indent=1).encode())
    sweep_dir.write(sweep_dir.path("summary.md"), table(rows).encode())
    return rows


def table(rows: list[dict]) -> str:
    """The trials as a Markdown table: name, params, status, score, error."""
    keys = list(rows[0]["params"]) if rows else []
    lines = ["| trial | " + " | ".join(keys) + " | status | score | error |", "|---" * (len(keys) + 4) + "|"]
    for r in rows:
        score = r["metrics"].get(SCORE)
        lines.append(f"| {r['name']} | " + " | ".join(str(r["params"].get(k, "")) for k in keys)
                     + f" | {r['status']} | {'' if score is None else f'{score:.4f}'} | {r['error']} |")
    return "\n".join(lines) + "\n"


def dry_run(trials: list[Trial]) -> str:
    """What ``--dry-run`` prints: one line per trial, with its params and resources."""
    lines = [f"{len(trials)} trials"]
    for t in trials:
        params = ", ".join(f"{k}={v}" for k, v in t.params.items())
        lines.append(f"  {t.name}: {params or '(base config)'}; resources {t.bundles}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- MLflow


class SweepTracking:
    """The sweep's MLflow run: a parent for every trial's run, and the summary table at the end. Disabled
    when the trials train without tracking."""

    def __init__(self, uri: str = "", experiment_id: str = "", run_id: str = ""):
        self.uri, self.experiment_id, self.run_id = uri, experiment_id, run_id

    @property
    def enabled(self) -> bool:
        return bool(self.run_id)

    @classmethod
    def open(cls, s: SweepFile, trials: list[Trial], root: str, resume: bool) -> SweepTracking:
        from vgim_dist.tracking.logger import client  # noqa: PLC0415
        from vgim_dist.tracking.server import embedded_uri  # noqa: PLC0415
        from vgim_dist.tracking.tracker import experiment, flat_params, log_params  # noqa: PLC0415

        cfg = trial_config(trials[0].config) if trials else None
        if cfg is None or not cfg.tracking.enabled:
            return cls()
        if not cfg.tracking.uri and "://" in root:
            raise UserError(f"the sweep directory {root} is not local, and the trials' tracking.uri is empty",
                            "set.tracking.uri", "point it at a tracking server, e.g. http://mlflow.internal:5000")
        uri = cfg.tracking.uri or embedded_uri(root)
        sweep_dir = RunDir(root, cfg.data.endpoint_url)
        ids_file = sweep_dir.tracking_ids
        c = client(uri)
        if resume and sweep_dir.exists(ids_file):
            ids = json.loads(sweep_dir.read(ids_file))
            c.update_run(ids["run_id"], status="RUNNING")
            return cls(uri, ids["experiment_id"], ids["run_id"])
        exp_id = experiment(c, cfg.tracking.experiment, uri)
        run_id = c.create_run(exp_id, run_name=f"sweep {os.path.basename(root)}", tags={
            "mlflow.source.name": "vgim sweep", "vgim.sweep_dir": root}).info.run_id
        log_params(c, run_id, flat_params(to_dict(s)))
        sweep_dir.write(ids_file, json.dumps({"tracking_uri": uri, "experiment_id": exp_id, "run_id": run_id},
                                             indent=1).encode())
        log.info("sweep: MLflow run %s at %s", run_id, uri)
        return cls(uri, exp_id, run_id)

    def overrides(self) -> list[str]:
        """What every trial's config gets: the sweep's store, and its run as the trial's parent."""
        return [f"tracking.uri={self.uri}", f"tracking.parent_run={self.run_id}"]

    def finish(self, rows: list[dict], sweep_dir: RunDir) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric  # noqa: PLC0415

        from vgim_dist.tracking.logger import client  # noqa: PLC0415

        c = client(self.uri)
        c.log_text(self.run_id, table(rows), "summary.md")
        c.log_text(self.run_id, json.dumps(rows, indent=1), "summary.json")
        count = {k: sum(r["status"] == k for r in rows) for k in ("FINISHED", "STOPPED")}
        failed = len(rows) - sum(count.values())
        best = [r["metrics"][SCORE] for r in rows if SCORE in r["metrics"]][:1]   # rows are ranked
        c.log_batch(self.run_id, metrics=[Metric("trials_finished", count["FINISHED"], 0, 0),
                                          Metric("trials_stopped", count["STOPPED"], 0, 0),
                                          Metric("trials_failed", failed, 0, 0)]
                    + [Metric(f"best_{SCORE}", b, 0, 0) for b in best])
        c.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
