"""Driver side of tracking: one MLflow parent run per training job, one child run per stage.

The run ids live in ``<run.dir>/mlflow.json``, so ``--resume`` (and a restarted job) logs into the same
runs. Workers get a `StageRef` per stage and log through `StageLogger`; the driver logs the config, the
environment, the loss curves and the trained encoder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Collection
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgim_dist.config import Config, ConfigError, dump_config, redact, to_dict
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import write_bytes
from vgim_dist.tracking.figures import loss_figures
from vgim_dist.tracking.logger import MAX_BATCH, StageRef, client, start_system_metrics
from vgim_dist.tracking.server import embedded_uri, ui_address

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"key|secret|token|passw|credential", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"://[^/@\s]+:[^/@\s]+@")   # scheme://user:password@host
_MAX_PARAM_LEN = 6000                                   # MLflow's limit on a param value
_BATCH = 100                                            # MLflow's limit on params (and tags) per log_batch
_PACKAGES = ("vgim-dist", "torch", "torchaudio", "numpy", "mlflow", "ray", "deepspeed")
MISSING_STEPS_TAG = "vgim.missing_steps"  # on a stage run that ended without every logged step
_STEP_KEY = "step_time_s"                 # in every training row, and every stage logs it (either runner)


# The experiment's kind: MLflow UIs that read it open the experiment on its training runs. MLflow 3.17's UI
# follows its own "GenAI / Model training" switch instead (remembered per browser, GenAI at first); the
# addresses printed here and by `vgim ui` set that switch (`server.TRAINING_VIEW`).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def move_credentials_to_env(cfg: Config) -> None:
    """Take ``user:password@`` out of ``tracking.uri`` and into MLFLOW_TRACKING_USERNAME/PASSWORD (where those
    are not set already), so that no file, log line, MLflow param or Ray worker ever holds the password."""
    uri = cfg.tracking.uri
    if redact(uri) == uri:
        return
    scheme, rest = uri.split("://", 1)
    userinfo, host = rest.split("@", 1)
    user, _, password = userinfo.partition(":")
    from urllib.parse import unquote  # noqa: PLC0415

    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    cfg.tracking.uri = f"{scheme}://{host}"
    log.info("tracking: credentials taken from tracking.uri into MLFLOW_TRACKING_USERNAME/PASSWORD; set those "
             "in the environment instead of the URI")


def run_names(cfg: Config) -> tuple[str, list[str]]:
    """Names that tell twenty runs apart, even collapsed: ``vgim-thesis V-GIM s3 pipeline 2k steps on words``
    (what the parent holds: method, seed, runner, steps and corpus) and ``stage-1 (M1-M3)``."""
    cpc = len(cfg.model.modules) == 1 and cfg.model.modules[0].autoregressor and cfg.model.modules[0].layers
    method = "CPC" if cpc else "V-GIM" if cfg.model.variational else "GIM"
    steps = f"{cfg.run.steps // 1000}k" if cfg.run.steps >= 1000 and cfg.run.steps % 1000 == 0 else cfg.run.steps
    corpus = cfg.data.uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(":")   # s3://b/words/ -> words, noise://
    parts = [cfg.run.name, method, f"s{cfg.seed}", cfg.run.runner, f"{steps} steps on {corpus}"]
    if cfg.run.name.lower().replace("-", "").startswith(method.lower().replace("-", "")):
        parts.remove(method)
    stages = [f"stage-{s} (M{m[0]}" + (f"-M{m[-1]})" if len(m) > 1 else ")") for s, m in enumerate(cfg.stage_modules())]
    return " ".join(p for p in parts if p), stages


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if "://" in cfg.run.dir:
        raise ConfigError(f"tracking.uri: required when run.dir is not a local path ({cfg.run.dir}); "
                          "point it at a tracking server, e.g. http://mlflow.internal:5000")
    return embedded_uri(cfg.run.dir)


def flat_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (list items of mappings by index, other lists as one
    JSON value), values cut to MLflow's limit, and nothing that looks like a credential."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out: dict[str, str] = {}
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            out.update(flat_params(v, f"{key}."))
            continue
        text = v if isinstance(v, str) else json.dumps(v)
        if _SECRET_KEY.search(str(k)) or _URL_PASSWORD.search(text):
            continue
        out[key] = text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."
    return out


def environment_tags() -> dict[str, str]:
    """Git commit of the code that runs, and the versions of the packages that decide the numbers."""
    tags = {"version.python": platform.python_version()}
    for p in _PACKAGES:
        try:
            tags[f"version.{p}"] = version(p)
        except PackageNotFoundError:
            pass
    try:
        tags["mlflow.source.git.commit"] = _git("rev-parse", "HEAD")
        tags["vgim.git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        pass  # an installed wheel or an image without git: the versions still say what ran
    return tags


def _git(*args: str) -> str:
    """``git args`` in the checkout this package runs from (not the working directory)."""
    return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def _span(steps: list[int]) -> str:
    """``5, 10, 15`` for a few steps, ``20 ... 400 (77 steps)`` for many."""
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]} ... {steps[-1]} ({len(steps)} steps)"


def experiment(c: Any, name: str, uri: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created if new. A tracking server keeps its
    artifacts where it was told to; a database or file store gets them in ``mlartifacts`` beside it, never
    in the working directory (MLflow's default, ``./mlruns``)."""
    exp = c.get_experiment_by_name(name)
    location = None if uri.startswith(("http://", "https://")) else _beside_store(uri)
    exp_id = exp.experiment_id if exp else c.create_experiment(name, location, tags=EXPERIMENT_KIND)
    if exp and "mlflow.experimentKind" not in exp.tags:
        c.set_experiment_tag(exp_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp_id


def _beside_store(uri: str) -> str:
    """``<folder of the store>/mlartifacts`` as a file URI: sqlite:////a/b/mlflow.db -> file:///a/b/mlartifacts."""
    from urllib.parse import urlparse  # noqa: PLC0415

    path = urlparse(uri).path
    store = Path(path[1:] if uri.startswith("sqlite:") else path if uri.startswith("file:") else uri).resolve()
    return (store.parent if store.suffix else store).joinpath(RunDir.ARTIFACTS).as_uri()


def log_params(c: Any, run_id: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    """Params and tags of a run, in batches of MLflow's limit."""
    from mlflow.entities import Param, RunTag  # noqa: PLC0415

    p = [Param(k, v) for k, v in (params or {}).items()]
    t = [RunTag(k, v) for k, v in (tags or {}).items()]
    for j in range(0, max(len(p), len(t)), _BATCH):
        c.log_batch(run_id, params=p[j:j + _BATCH], tags=t[j:j + _BATCH])


class RunTracker:
    """The job's runs. Disabled (every method a no-op) when tracking is off or the store is unreachable."""

    def __init__(self, cfg: Config, uri: str = "", parent_id: str | None = None, stage_ids: list[str] | None = None,
                 monitor: Any = None, partial: bool = False):
        self.cfg, self.uri, self.parent_id = cfg, uri, parent_id
        self.stage_ids = stage_ids or []
        # New runs for a resumed job (another tracking.uri): they hold the steps from the resumed one on only.
        self._partial = partial
        self._monitor = monitor
        self._ended = False

    @property
    def enabled(self) -> bool:
        return self.parent_id is not None

    @classmethod
    def start(cls, cfg: Config, resume: bool = False, run_dir: RunDir | None = None) -> RunTracker:
        """Open the job's runs: reuse those in ``<run.dir>/mlflow.json`` with ``resume``, else create them.
        Called once the run's start is decided, so a refused run opens none."""
        if not cfg.tracking.enabled:
            return cls(cfg)
        uri = tracking_uri(cfg)
        try:
            return cls._open(cfg, uri, resume, run_dir or RunDir.of(cfg))
        except Exception as e:  # noqa: BLE001 - an unreachable store must not stop training
            log.warning("tracking: cannot use %s (%s); training without MLflow, metrics stay in metrics.jsonl",
                        redact(uri), str(e).splitlines()[0] if str(e) else type(e).__name__)
            return cls(cfg)

    @classmethod
    def _open(cls, cfg: Config, uri: str, resume: bool, run_dir: RunDir) -> RunTracker:
        c = client(uri)
        fs, ids_file = run_dir.fs, run_dir.tracking_ids
        saved = _saved_ids(fs, ids_file, c) if resume and fs.exists(ids_file) else {}
        if saved.get("tracking_uri") != redact(uri):
            saved = {}
        params = flat_params(to_dict(cfg))
        stages = cfg.stage_modules()
        names = run_names(cfg)
        tags = {**environment_tags(), "topology.runner": cfg.run.runner, "topology.stages": json.dumps(stages),
                "topology.device": cfg.run.device, "topology.gpus_visible": str(torch.cuda.device_count())}

        if saved:
            exp_id, parent = saved["experiment_id"], saved["parent_run_id"]
            logged = c.get_run(parent).data.params
            # MLflow params are immutable: a resume that changes the config (say run.steps) records the new
            # values as tags and keeps the first values as params.
            tags.update({f"resume.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
            params = {k: v for k, v in params.items() if k not in logged}
            c.update_run(parent, status="RUNNING")
            log.info("tracking: resuming MLflow run %s at %s", parent, redact(uri))
        else:
            exp_id = experiment(c, cfg.tracking.experiment, uri)
            run_tags = {"mlflow.source.name": "vgim train", "vgim.run_dir": cfg.run.dir}
            if cfg.tracking.parent_run:   # a sweep's trial: listed under the sweep's run
                run_tags["mlflow.parentRunId"] = cfg.tracking.parent_run
            parent = c.create_run(exp_id, run_name=names[0], tags=run_tags).info.run_id
            log.info("tracking: MLflow run %s (%s) at %s", parent, names[0], redact(uri))
        log.info("tracking: see it at %s", ui_address(uri, exp_id, parent) or f"`vgim ui {cfg.run.dir}`")
        log_params(c, parent, params, tags)
        c.log_text(parent, dump_config(cfg), "config.yaml")

        old = {json.dumps(s["modules"]): s["run_id"] for s in saved.get("stages", [])}
        stage_ids = []
        for s, modules in enumerate(stages):
            run_id = old.get(json.dumps(modules))
            if run_id:
                c.update_run(run_id, status="RUNNING")
            else:
                stage_tags = {"mlflow.parentRunId": parent, "vgim.stage": str(s), "vgim.modules": json.dumps(modules)}
                run_id = c.create_run(exp_id, run_name=names[1][s], tags=stage_tags).info.run_id
            stage_ids.append(run_id)
        write_bytes(fs, ids_file, json.dumps({
            "tracking_uri": redact(uri), "experiment_id": exp_id, "parent_run_id": parent,
            "stages": [{"modules": m, "run_id": r} for m, r in zip(stages, stage_ids)]}, indent=1).encode())
        # The reference runner trains in this process: its samples go to the parent run. Pipeline stages
        # sample their own worker processes into their child runs.
        sample_here = cfg.tracking.system_metrics and cfg.run.runner == "reference"
        monitor = start_system_metrics(uri, parent, cfg.tracking.retries) if sample_here else None
        return cls(cfg, uri, parent, stage_ids, monitor, partial=resume and not saved)

    def stage_ref(self, stage: int) -> StageRef | None:
        """What stage ``stage``'s worker passes to `StageLogger`; None when tracking is off."""
        if not self.enabled:
            return None
        t = self.cfg.tracking
        # The reference runner trains every stage in the driver, whose parent run already samples it.
        own_process = self.cfg.run.runner != "reference"
        return StageRef(self.uri, self.stage_ids[stage], stage, t.flush_every, t.retries,
                        t.system_metrics and own_process, t.max_pending)

    def parent_ref(self) -> StageRef | None:
        """The parent run as a `StageRef`, for what belongs to the whole job (the background evaluator's
        probes); None when tracking is off."""
        if not self.enabled:
            return None
        t = self.cfg.tracking
        return StageRef(self.uri, self.parent_id, -1, t.flush_every, t.retries, False)

    def finish(self, summary: dict, rows: list[dict], encoder: Callable[[], nn.Module]) -> None:
        """Log loss curves of the metric ``rows``, summary.json and the trained ``encoder()`` (registered under
        tracking.model_name), then end the runs: FINISHED, except a stage run that lacks some of the logged
        steps (its rows were dropped, or never acknowledged by a store that did not apply them), which ends
        FAILED with the tag ``vgim.missing_steps``. A failure here is a warning, and leaves the runs RUNNING:
        the run itself is complete."""
        if not self.enabled:
            return
        try:
            self._finish(summary, rows, encoder)
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: could not finish MLflow run %s (%s); checkpoints and summary.json are complete",
                        self.parent_id, e)

    def _finish(self, summary: dict, rows: list[dict], encoder: Callable[[], nn.Module]) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        c = client(self.uri)
        for i, fig in loss_figures(rows).items():
            c.log_figure(self.parent_id, fig, f"curves/module-{i}.png")
        c.log_dict(self.parent_id, summary, "summary.json")
        # Every row on the parent too: the page a user lands on draws loss curves, and the runs table compares
        # jobs by their last values without opening stages. Steps the parent holds already (a resumed job's
        # earlier finish) are not logged twice.
        final = summary.get("final") or {}
        history = [r for r in rows if r["step"] <= final.get("step", -1)] or ([final] if final else [])
        key = next((k for r in history for k in r if k != "step"), None)
        held = {m.step for m in c.get_metric_history(self.parent_id, key)} if key else set()
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, r["step"]) for r in history if r["step"] not in held
                   for k, v in r.items() if k != "step"]
        for i in range(0, len(metrics), MAX_BATCH):
            c.log_batch(self.parent_id, metrics=metrics[i:i + MAX_BATCH])
        self._log_encoder(encoder())
        incomplete = self._check_stage_runs(c, rows)
        self.end("FINISHED", failed=incomplete)

    def _check_stage_runs(self, c: Any, rows: list[dict]) -> list[str]:
        """The stage runs that lack a step of ``rows`` (metrics.jsonl), each tagged with what it lacks and
        named in a warning. Every stage logs every row's step, so a gap is a row lost on the way to MLflow."""
        logged = sorted({int(r["step"]) for r in rows if _STEP_KEY in r})   # training rows, not probes
        incomplete = []
        for s, run_id in enumerate(self.stage_ids):
            held = {m.step for m in c.get_metric_history(run_id, _STEP_KEY)}
            expected = [k for k in logged if not self._partial or k >= min(held, default=0)]
            missing = [k for k in expected if k not in held]
            if not missing:
                continue
            incomplete.append(run_id)
            listed = ",".join(map(str, missing[:200])) + (f",... ({len(missing)} in all)" if len(missing) > 200 else "")
            c.set_tag(run_id, MISSING_STEPS_TAG, listed)
            log.warning("tracking: the run of stage %d holds %d of the %d logged steps (missing %s); it ends FAILED "
                        "with the tag %s; metrics.jsonl has every row", s, len(expected) - len(missing),
                        len(expected), _span(missing), MISSING_STEPS_TAG)
        return incomplete

    def _log_encoder(self, encoder: nn.Module) -> None:
        import mlflow  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
        from mlflow.models import ModelSignature  # noqa: PLC0415
        from mlflow.types import Schema, TensorSpec  # noqa: PLC0415

        cfg = self.cfg
        # A batch of 2: torch.export specialises size-1 dimensions. The window length stays fixed at data.crop
        # because the export specialises a GRU's sequence length.
        example = torch.zeros(2, 1, cfg.data.crop)
        out = encoder(example)
        f32 = np.dtype(np.float32)
        signature = ModelSignature(Schema([TensorSpec(f32, (-1, 1, cfg.data.crop))]),
                                   Schema([TensorSpec(f32, (-1, *out.shape[1:]))]))
        mlflow.set_tracking_uri(self.uri)  # log_model writes through the fluent API's active run
        with mlflow.start_run(run_id=self.parent_id), warnings.catch_warnings():
            # Two harmless torch warnings on every export of this encoder: the GRU's flat weights are views of
            # its registered parameters, and the pt2 archive is read back from a bytes object MLflow holds.
            warnings.filterwarnings("ignore", "The tensor attributes .* were assigned during export", UserWarning)
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            # An exported program needs the torch that exported it, and nothing of ours: naming it spares
            # MLflow a subprocess that loads the model to guess (6 s on the smoke model).
            info = mlflow.pytorch.log_model(encoder, name="encoder", input_example=example.numpy(),
                                            signature=signature, serialization_format="pt2",
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                            registered_model_name=cfg.tracking.model_name or None)
        if cfg.tracking.model_name:
            log.info("tracking: registered %s version %s (models:/%s@latest)", cfg.tracking.model_name,
                     info.registered_model_version, cfg.tracking.model_name)

    def end(self, status: str, failed: Collection[str] = ()) -> None:
        """End the job's runs with MLflow ``status`` (FINISHED, KILLED: resumable, FAILED), those in ``failed``
        with FAILED. Never raises: the run's own outcome (or error) is the one to see."""
        if not self.enabled or self._ended:
            return
        self._ended = True
        try:
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None
            c = client(self.uri)
            for run_id in [*self.stage_ids, self.parent_id]:
                c.set_terminated(run_id, "FAILED" if run_id in failed else status)
        except Exception as e:  # noqa: BLE001
            log.warning("tracking: could not end MLflow run %s (%s)", self.parent_id, str(e).splitlines()[0])

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        """A job that raises leaves its runs KILLED (Ctrl-C) or FAILED, never RUNNING."""
        if exc_type is not None:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _saved_ids(fs, ids_file: str, c) -> dict:
    """The run ids a resume logs into, from ``mlflow.json``; empty, with a warning naming the file, when it is
    damaged (not JSON, or naming a run the store does not have): the resume then logs into new runs."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        saved = json.loads(fs.cat_file(ids_file))
        c.get_run(saved["parent_run_id"])
        return saved
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        why = f"the store has no such parent run ({' '.join(str(e).split())[:120]})"
    except (ValueError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    log.warning("tracking: %s is damaged (%s); the resumed run logs into new MLflow runs", ids_file, why)
    return {}
