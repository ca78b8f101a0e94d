"""``vgim ui``: the MLflow UI over a run's embedded store, or over any tracking URI."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from vgim_dist.config import redact
from vgim_dist.errors import UserError
from vgim_dist.run_dir import RunDir
from vgim_dist.tracking.server import TRAINING_VIEW, embedded_uri, free_port, start_server, wait_ready


def cmd_ui(args: argparse.Namespace) -> int:
    if args.uri.startswith(("http://", "https://")):
        print(f"{redact(args.uri)} is a tracking server already: open it in a browser")
        return 0
    if args.uri:
        store, artifacts = args.uri, None
    else:
        db = RunDir.local_path(args.run_dir, RunDir.TRACKING_STORE)
        if not db.exists():
            raise UserError(f"no MLflow store in {args.run_dir}", str(db),
                            "give the run directory of a tracked training run (tracking is on by default)")
        store, artifacts = embedded_uri(args.run_dir), str(RunDir.local_path(args.run_dir, RunDir.ARTIFACTS))
    port = args.port or free_port()
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise UserError(f"port {port} is taken", f"127.0.0.1:{port}",
                            "stop what uses it, or pass --port N (--port 0: any free port)") from None
    url = f"http://127.0.0.1:{port}"
    proc = start_server(store, port, artifacts, log=sys.stderr)  # stdout: only the address line
    # SIGTERM (kill, a service manager, a closed terminal) stops the server too, as Ctrl-C does.
    stop = signal.signal(signal.SIGTERM, _interrupt)
    hangup = signal.signal(signal.SIGHUP, _interrupt)
    try:
        wait_ready(proc, url, timeout=300)   # seconds on a quiet machine, minutes on a loaded one
        print(f"MLflow UI at {url}{landing_page(args)} (store {redact(store)}); Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        raise UserError(f"the MLflow server did not start: {e}", redact(store), "see its output above") from None
    finally:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, hangup)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def landing_page(args: argparse.Namespace) -> str:
    """The part of the UI's address that opens on the training runs (the UI's default is its GenAI
    overview): the run's experiment when the run directory names it."""
    ids = Path(args.run_dir) / "mlflow.json"
    if not args.uri and ids.exists():
        return f"/#/experiments/{json.loads(ids.read_text())['experiment_id']}/runs?{TRAINING_VIEW}"
    return f"/#/experiments?{TRAINING_VIEW}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def add_tracking_commands(subparsers) -> None:
    """Register ``ui``."""
    p = subparsers.add_parser("ui", help="MLflow UI on 127.0.0.1 for a run directory or a tracking URI")
    p.add_argument("run_dir", nargs="?", default=".", help="run directory holding mlflow.db (default: .)")
    p.add_argument("--uri", default="", help="a tracking URI instead, e.g. sqlite:///path/mlflow.db")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1; 0 = any free port")
    p.set_defaults(func=cmd_ui)
