"""``vgim ui``: the MLflow UI over a run's embedded store, or over any tracking URI."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from vgim_dist.tracking.server import free_port, start_server, wait_ready
from vgim_dist.tracking.tracker import embedded_uri


def cmd_ui(args: argparse.Namespace) -> int:
    if args.uri.startswith(("http://", "https://")):
        print(f"{args.uri} is a tracking server already: open it in a browser")
        return 0
    if args.uri:
        store, artifacts = args.uri, None
    else:
        if not (Path(args.run_dir) / "mlflow.db").exists():
            print(f"vgim ui: no {Path(args.run_dir) / 'mlflow.db'}; train with tracking.enabled=true first",
                  file=sys.stderr)
            return 2
        store, artifacts = embedded_uri(args.run_dir), str(Path(args.run_dir).resolve() / "mlartifacts")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(store, port, artifacts, log=sys.stderr)  # stdout: only the address line
    try:
        wait_ready(proc, url)
        print(f"MLflow UI at {url} (store {store}); Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"vgim ui: {e}", file=sys.stderr)
        return 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def add_tracking_commands(subparsers) -> None:
    """Register ``ui``."""
    p = subparsers.add_parser("ui", help="MLflow UI on 127.0.0.1 for a run directory or a tracking URI")
    p.add_argument("run_dir", nargs="?", default=".", help="run directory holding mlflow.db (default: .)")
    p.add_argument("--uri", default="", help="a tracking URI instead, e.g. sqlite:///path/mlflow.db")
    p.add_argument("--port", type=int, default=5000, help="0 = any free port")
    p.set_defaults(func=cmd_ui)
