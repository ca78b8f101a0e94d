"""A local MLflow server process: what `vgim ui` starts, and what the tests track against."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import IO

from vgim_dist.config import redact
from vgim_dist.run_dir import RunDir

# MLflow's UI opens on its GenAI view unless told otherwise; this query opens it on the training runs.
TRAINING_VIEW = "workflowType=machine_learning"


def ui_address(uri: str, experiment_id: str, run_id: str = "") -> str:
    """The MLflow UI page of a run (or of an experiment's runs) on the server at ``uri``, in its training view;
    empty for a file or database store, which `vgim ui` serves."""
    if not uri.startswith(("http://", "https://")):
        return ""
    page = f"/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{redact(uri).rstrip('/')}{page}?{TRAINING_VIEW}"


def embedded_uri(run_dir: str) -> str:
    """The default store: a SQLite file in the run directory."""
    return f"sqlite:///{RunDir.local_path(run_dir, RunDir.TRACKING_STORE)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_uri: str, port: int, artifacts: str | None = None, log: IO | None = None) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``store_uri``, its output to ``log`` (None: inherited).
    ``artifacts`` is where it keeps artifacts uploaded through it; runs that name their own artifact
    location (the embedded store's ``mlartifacts``) keep it."""
    # One worker process: one writer per SQLite store, and 0.5 GB instead of 4 workers' worth.
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    # The job-execution workers take ~2 GB more memory and nothing here uses them.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60.0) -> None:
    """Block until ``url``/health answers; raise if the server exits or is not up in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"mlflow server at {url} not ready after {timeout:.0f} s")
