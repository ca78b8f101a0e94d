"""Four smoke trials as one sweep at concurrency 2, against the same four one after another, in one invocation.

    .venv/bin/python benchmarks/sweep.py [--steps 200] [--cpus 1]

Both sweeps run the same four trials (seeds 0-3 of the smoke config, one stage, ``run.threads`` = the trial's
CPUs, tracking off, no probes) on a Ray started here, each with a fresh sweep directory. Prints, for each:
the wall time of ``run_sweep`` (Ray's start included), the trials' own time (each trial's ``trial.json``
``started`` to ``ended``: building its config, training, writing its record), and what is left per trial:
Tune's overhead (scheduling, starting each trial's worker process, importing torch there, Ray's start
shared out). Then the ratio of the two wall times: on a machine with 2 free cores the ceiling is 2.
Timings compare only on the same idle machine, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vgim_dist.config import from_dict
from vgim_dist.sweep.run import run_sweep
from vgim_dist.sweep.spec import SweepFile, check


def sweep(root: Path, concurrency: int, steps: int, cpus: float) -> SweepFile:
    s = from_dict(SweepFile, {
        "base": "configs/smoke.yaml", "dir": str(root / f"concurrency-{concurrency}"),
        "set": {"run": {"steps": steps, "log_every": 10}, "pipeline": {"stages": []},
                "checkpoint": {"every": 0}, "tracking": {"enabled": False}},
        "space": {"seed": {"grid": [0, 1, 2, 3]}}, "concurrency": concurrency,
        "resources": {"cpus": cpus}})
    check(s)
    return s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200, help="training steps per trial")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per trial (its torch threads)")
    a = p.parse_args()
    walls = {}
    with tempfile.TemporaryDirectory(prefix="vgim-bench-sweep-") as d:
        for concurrency in (1, 2):
            s = sweep(Path(d), concurrency, a.steps, a.cpus)
            started = time.monotonic()
            rows = run_sweep(s, "benchmarks/sweep.py")
            walls[concurrency] = wall = time.monotonic() - started
            assert all(r["status"] == "FINISHED" for r in rows), rows
            records = [json.loads(f.read_text()) for f in Path(s.dir).glob("trials/*/trial.json")]
            inside = sum(r["ended"] - r["started"] for r in records)
            # At concurrency 2 the trials overlap: their own time covers about inside / 2 of the wall time.
            overhead = (wall - inside / concurrency) / len(records)
            print(f"concurrency {concurrency}: {wall:.1f} s wall for {len(records)} trials of {a.steps} steps; "
                  f"{inside / len(records):.1f} s inside each trial; outside them {overhead:.1f} s per trial")
    print(f"4 trials one after another / 2 at once: {walls[1] / walls[2]:.2f}x")


if __name__ == "__main__":
    main()
