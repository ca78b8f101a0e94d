"""``vgim sequential``: sequential greedy training, module by module (docs/latents.md). Module 0 trains on
audio for run.steps steps, its outputs are stored as latent shards (`vgim encode`), module 1 trains on them
with module 0 frozen, and so on to the last module, whose run holds the whole encoder.

Under run.dir: ``module-<k>/`` is the run that trains module k (a run of the config cut to modules 0..k,
those below k frozen), ``latents-<k>/`` module k's latent shards over data.uri, ``sequence.json`` the
sequence's MLflow run. Every step is resumable, so the command run again after a stop at any point
continues where it stopped: a finished run is kept, an unfinished one resumed from its last checkpoint,
latent shards kept where complete. Each module's MLflow run is nested under the sequence's run.
"""

from __future__ import annotations

import copy
import json
import logging

from vgim_dist.config import Config, ConfigError
from vgim_dist.encode import encode
from vgim_dist.launch import absolute_paths, train
from vgim_dist.run_dir import RunDir
from vgim_dist.tracking.logger import client
from vgim_dist.tracking.tracker import experiment, tracking_uri

log = logging.getLogger(__name__)
SEQUENCE = "sequence.json"


def module_config(cfg: Config, k: int, data: str, tracking: str, parent: str = "") -> Config:
    """The config of the run that trains module k: the model cut to modules 0..k, one stage, fed by ``data``
    (audio for module 0, module k-1's latent shards above), in ``<run.dir>/module-<k>``, its MLflow run
    nested under ``parent`` (the sequence's run) from the start."""
    sub = copy.deepcopy(cfg)
    sub.run.dir = f"{cfg.run.dir.rstrip('/')}/module-{k}"
    sub.run.name = f"{cfg.run.name}-module-{k}"
    sub.model.modules = cfg.model.modules[:k + 1]
    sub.data.uri = data
    sub.pipeline.stages, sub.pipeline.replicas = [], []
    sub.tracking.uri = tracking
    sub.tracking.parent_run = parent
    return sub


def sequential(cfg: Config, dtype: str = "float32", chunk_seconds: float = 10.0, workers: int = 0) -> dict:
    """Train ``cfg``'s modules one after the other (see the module's docstring); returns each module's run
    summary and the run directory that holds the whole encoder. ``dtype``, ``chunk_seconds`` and ``workers``
    go to `vgim encode`."""
    cfg = absolute_paths(cfg)
    if cfg.data.uri == "noise://":
        raise ConfigError("data.uri: sequential training stores each module's outputs over shards; give audio "
                          "shards (vgim data prepare), not noise://")
    if cfg.data.lower_run:
        raise ConfigError("data.lower_run: sequential training trains every module itself; drop data.lower_*")
    root = RunDir.of(cfg)
    uri = tracking_uri(cfg) if cfg.tracking.enabled else ""     # one store for every module's run
    parent = _sequence_run(cfg, root, uri) if uri else None
    data, summaries = cfg.data.uri, []
    for k in range(len(cfg.model.modules)):
        sub = module_config(cfg, k, data, uri, parent or "")
        summaries.append(_trained(sub))
        if k < len(cfg.model.modules) - 1:
            data = f"{cfg.run.dir.rstrip('/')}/latents-{k}"
            encode(sub.run.dir, k, cfg.data.uri, data, dtype=dtype, chunk_seconds=chunk_seconds,
                   endpoint_url=cfg.data.endpoint_url, workers=workers, log=log.info)
    if parent:
        client(uri).set_terminated(parent, "FINISHED")
    return {"encoder": summaries[-1]["run_dir"], "modules": summaries}


def _trained(sub: Config) -> dict:
    """The summary of ``sub``'s run: kept when it has run all its steps, else trained (resumed when started)."""
    run_dir = RunDir.of(sub)
    if run_dir.exists(run_dir.summary):
        summary = json.loads(run_dir.read(run_dir.summary))
        if summary.get("steps") == sub.run.steps:
            log.info("module %d: kept %s (trained for %d steps)", len(sub.model.modules) - 1, sub.run.dir,
                     sub.run.steps)
            return summary
    return train(sub, resume=run_dir.exists(run_dir.config))


def _sequence_run(cfg: Config, root: RunDir, uri: str) -> str:
    """The sequence's MLflow run (the parent of every module's run): the one ``sequence.json`` names, else a
    new one."""
    c = client(uri)
    path = root.path(SEQUENCE)
    if root.exists(path):
        run_id = json.loads(root.read(path))["parent_run_id"]
        c.update_run(run_id, status="RUNNING")
        return run_id
    # With the embedded store, artifacts beside it (as each module's run would put them), never in the cwd.
    exp_id = experiment(c, cfg.tracking.experiment, uri)
    run_id = c.create_run(exp_id, run_name=f"{cfg.run.name} sequential", tags={
        "mlflow.source.name": "vgim sequential", "vgim.run_dir": cfg.run.dir,
        "vgim.method": "sequential greedy"}).info.run_id
    root.write(path, json.dumps({"tracking_uri": uri, "parent_run_id": run_id}).encode())
    return run_id
