"""The run directory: one object that owns its layout and its storage handle (a local path or
s3://bucket/prefix), built once by the driver and handed to the runners and the workers. The checkpoint
manager and the metrics log take it whole and lay out their own parts (checkpoints/, metrics.jsonl).

    <run.dir>/config.yaml          the resolved config the run trains with
    <run.dir>/metrics.jsonl        one row per logged step (train/metrics.py)
    <run.dir>/summary.json         the run's summary, once it ends
    <run.dir>/checkpoints/         committed checkpoints (train/checkpoint.py)
    <run.dir>/workers/<name>.json  where each stage worker runs
    <run.dir>/plan/                the planner's profile cache and plan.json
    <run.dir>/mlflow.json, mlflow.db, mlartifacts/   the tracking store's run ids, its embedded store
    <run.dir>/eval/                evaluation outputs (local run directories only)
    <run.dir>/ray/                 Ray Train's own state, for a local run directory
"""

from __future__ import annotations

from pathlib import Path

import fsspec

from vgim_dist.storage import is_local, open_dir, read_bytes, write_bytes


class RunDir:
    # Files that live only in a local run directory (the embedded tracking store, evaluation outputs), by name.
    TRACKING_STORE = "mlflow.db"
    ARTIFACTS = "mlartifacts"
    EVAL = "eval"
    # A sweep directory (vgim_dist/sweep/run.py): the sweep's record, and each trial's end in its run directory.
    SWEEP = "sweep.json"
    TRIAL = "trial.json"

    uri: str                        # as configured (run.dir), made absolute by the launch
    endpoint_url: str               # S3 endpoint (data.endpoint_url), if any
    fs: fsspec.AbstractFileSystem
    root: str                       # the directory's path on ``fs``

    def __init__(self, uri: str, endpoint_url: str = ""):
        self.uri, self.endpoint_url = uri, endpoint_url
        self.fs, self.root = open_dir(uri, endpoint_url)

    @classmethod
    def of(cls, cfg) -> RunDir:
        """The run directory of a `Config`."""
        return cls(cfg.run.dir, cfg.data.endpoint_url)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    # ----------------------------------------------------------------------------------------- layout

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def config(self) -> str:
        return self.path("config.yaml")

    @property
    def summary(self) -> str:
        return self.path("summary.json")

    @property
    def tracking_ids(self) -> str:
        return self.path("mlflow.json")

    @property
    def plan(self) -> str:
        return self.path("plan/plan.json")

    def profile(self, key: str) -> str:
        return self.path(f"plan/profile-{key}.json")

    def worker(self, name: str) -> str:
        return self.path(f"workers/{name}.json")

    @staticmethod
    def local_path(run_dir: str, name: str) -> Path:
        """``<run_dir>/<name>`` of a local run directory, absolute: the embedded tracking store, ``eval/``."""
        return Path(run_dir).expanduser().resolve() / name

    @property
    def local(self) -> bool:
        return is_local(self.fs)

    # ----------------------------------------------------------------------------------------- files

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read(self, path: str) -> bytes:
        return read_bytes(self.fs, path)

    def write(self, path: str, data: bytes) -> None:
        write_bytes(self.fs, path, data)
