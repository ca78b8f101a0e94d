"""Does ``vgim plan`` predict what the pipeline measures, and is its choice the fastest? One invocation:

    .venv/bin/python benchmarks/plan.py [--config configs/vgim.yaml] [--batch 8] [--crop 20480] [--workers 3]
        [--steps 8] [--warmup 3] [--json benchmarks/results/plan-cpu.json]

1. profiles the modules here (as ``vgim plan`` does) and plans for ``--workers`` workers;
2. runs the chosen layout and the comparison layouts (2-stage splits [[0],[1,2,3]] and [[0,1],[2,3]], replicas
   [2, 1], one stage at every thread of one worker) with the pipeline runner, timed from their metrics rows
   after ``--warmup`` steps, and the reference runner at every thread;
3. prints predicted against measured seconds per step for each, and the two goals: every prediction within
   15 %, and the chosen layout at least as fast as the best comparison layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pipeline import run_time

from vgim_dist.config import load_config
from vgim_dist.plan import estimate, rank, table
from vgim_dist.plan.profile import cached_profile, host_cores

COMPARE = [("[[0], [1, 2, 3]]", [[0], [1, 2, 3]], [1, 1], 1), ("[[0, 1], [2, 3]]", [[0, 1], [2, 3]], [1, 1], 1),
           ("replicas [2, 1]", [[0], [1, 2, 3]], [2, 1], 1), ("one stage, all threads", [[0, 1, 2, 3]], [1], 0)]


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vgim.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=20480)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the figures to this file")
    ap.add_argument("--run-dir", default="", help="keep the profile here (<run-dir>/plan/) and reuse it on the "
                    "next invocation (default: a temporary directory, profiled afresh)")
    args = ap.parse_args()
    overrides = ["data.uri=noise://", f"data.batch_size={args.batch}", f"data.crop={args.crop}", "run.device=cpu"]
    cores = host_cores()
    started, load_before = time.time(), load_average()

    with tempfile.TemporaryDirectory(prefix="vgim-plan-bench-") as work:
        cfg = load_config(args.config, [*overrides, f"run.dir={args.run_dir or work}"])
        prof = cached_profile(cfg, "cpu")
    print(f"profile: {prof.cost_s:.1f} s to measure (load average before: {load_before})", flush=True)
    plans = rank(prof, args.workers)
    print(table(prof, plans))
    best = plans[0]

    layouts = [("chosen: " + best.describe(), [s.modules for s in best.stages], [s.replicas for s in best.stages],
                best.threads)]
    for name, stages, reps, threads in COMPARE:
        threads = threads or cores
        if (stages, reps, threads) != (layouts[0][1], layouts[0][2], layouts[0][3]):
            layouts.append((name, stages, reps, threads))
    rows = []
    for name, stages, reps, threads in layouts:
        predicted = estimate(prof, stages, reps, threads).step_s
        measured = run_time(args.config, [*overrides, "run.runner=pipeline", f"pipeline.stages={stages}",
                                          f"pipeline.replicas={reps}", f"run.threads={threads}"],
                            args.steps, args.warmup)
        rows.append({"layout": name, "stages": stages, "replicas": reps, "threads": threads,
                     "predicted_s": predicted, "measured_s": measured, "error": predicted / measured - 1})
        print(f"{name:<44} predicted {predicted:7.3f} s  measured {measured:7.3f} s  "
              f"({predicted / measured - 1:+.0%})", flush=True)
    reference = run_time(args.config, [*overrides, "run.runner=reference", f"run.threads={cores}"],
                         args.steps, args.warmup)
    ref_predicted = estimate(prof, [[m.module for m in prof.modules]], [1], cores, ray=False).step_s
    print(f"{f'reference runner, {cores} threads (no Ray)':<44} predicted {ref_predicted:7.3f} s  measured "
          f"{reference:7.3f} s  ({ref_predicted / reference - 1:+.0%})")

    chosen, others = rows[0], rows[1:]
    within = [r for r in rows if abs(r["error"]) <= 0.15]
    fastest_other = min(r["measured_s"] for r in others)
    goals = {"predictions_within_15pct": len(within), "layouts": len(rows),
             "chosen_within_15pct": abs(chosen["error"]) <= 0.15,
             "chosen_at_least_as_fast_as_best_other": chosen["measured_s"] <= fastest_other,
             "chosen_over_best_other": fastest_other / chosen["measured_s"]}
    print(f"goal 1 (chosen and two others within 15 %): {len(within)} of {len(rows)} layouts within 15 %, chosen "
          f"{'within' if goals['chosen_within_15pct'] else 'outside'}")
    met = "met" if goals["chosen_at_least_as_fast_as_best_other"] else "not met"
    print(f"goal 2 (chosen at least as fast as the best other): {met} ({fastest_other / chosen['measured_s']:.2f}x)")
    print(f"load average before {load_before}, after {load_average()}; {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": " ".join([os.path.relpath(sys.executable), *sys.argv]), "cores": cores,
            "load_before": load_before, "load_after": load_average(), "profile": prof.to_dict(),
            "chosen": best.to_dict(), "rows": rows, "reference_all_threads_s": reference,
            "reference_predicted_s": ref_predicted, "goals": goals}, indent=1))


if __name__ == "__main__":
    main()
