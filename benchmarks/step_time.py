"""Reference-runner time per training step, and each module's share of it.

    .venv/bin/python benchmarks/step_time.py [--config configs/vgim.yaml] [--batch 8] [--crop 20480] [--steps 4]
    .venv/bin/python benchmarks/step_time.py --busy      # idle, then beside a one-core busy loop

With ``--busy``, each thread count is timed twice in a row, alone and then beside a separate process that
spins on one core, and the ratio slowed / idle is printed: the cost of one more runnable process on the
cores a training uses (a thread of an operator waits at its barrier for a sibling that lost its core).

Runs every (threads, allocator) combination in a fresh process, one after the other, so that all figures
come from one invocation on one machine. "tuned" keeps freed memory in the process (glibc's
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_) instead of returning large buffers to the kernel and
faulting them in again on every step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def measure(config: str, batch: int, crop: int, steps: int, threads: int) -> dict:
    import torch  # noqa: PLC0415 - imported in the measuring process only

    from vgim_dist.config import load_config  # noqa: PLC0415
    from vgim_dist.data.source import NoiseSource  # noqa: PLC0415
    from vgim_dist.train.stage import Stage  # noqa: PLC0415

    torch.set_num_threads(threads)
    cfg = load_config(config, [f"data.batch_size={batch}", f"data.crop={crop}", "data.uri=noise://"])
    n = len(cfg.model.modules)
    cfg.pipeline.stages = [[i] for i in range(n)]          # one stage per module: time each on its own
    stages = [Stage(cfg, i) for i in range(n)]
    source = NoiseSource(cfg.data, cfg.seed)
    per_module = [0.0] * n
    for step in range(steps + 1):                           # step 0 warms up
        x = source.batch(step)
        for i, stage in enumerate(stages):
            t = time.perf_counter()
            x, _ = stage.train_step(x)
            if step:
                per_module[i] += time.perf_counter() - t
    total = sum(per_module) / steps
    return {"threads": threads, "step_s": total, "share": [t / steps / total for t in per_module]}


def _child(args: argparse.Namespace, threads: int, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--batch", str(args.batch),
                          "--crop", str(args.crop), "--steps", str(args.steps), "--threads", str(threads)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_ratio(args: argparse.Namespace) -> None:
    """Each thread count alone, then beside a process spinning on one core: s/step and the ratio."""
    print(f"{args.config}: batch {args.batch} x {args.crop} samples, mean of {args.steps} steps after one "
          f"warm-up; {os.cpu_count()} cores; busy = one more process spinning on one core")
    print(f"{'threads':>7}  {'idle s/step':>11}  {'busy s/step':>11}  {'busy / idle':>11}")
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    for threads in (1, 2):
        idle = _child(args, threads, env)["step_s"]
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy = _child(args, threads, env)["step_s"]
        finally:
            spinner.kill()
            spinner.wait()
        print(f"{threads:>7}  {idle:>11.3f}  {busy:>11.3f}  {busy / idle:>10.2f}x")


def step_args(doc: str) -> argparse.ArgumentParser:
    """A parser with the step benchmarks' shared options: config, batch, crop, steps."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vgim.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=20480)
    ap.add_argument("--steps", type=int, default=4)
    return ap


def main() -> None:
    ap = step_args(__doc__)
    ap.add_argument("--busy", action="store_true", help="time 1 and 2 threads alone and beside a one-core busy "
                    "loop in another process; print the ratio")
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.threads:
        print(json.dumps(measure(args.config, args.batch, args.crop, args.steps, args.threads)))
        return
    if args.busy:
        busy_ratio(args)
        return

    print(f"{args.config}: batch {args.batch} x {args.crop} samples, mean of {args.steps} steps after one warm-up")
    print(f"{'threads':>7}  {'malloc':>7}  {'s/step':>7}  {'windows/s':>9}  module shares")
    results = {}
    for malloc in ("default", "tuned"):
        env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
        if malloc == "tuned":
            env.update(TUNED_MALLOC)
        for threads in (1, 2):
            r = _child(args, threads, env)
            results[(malloc, threads)] = r["step_s"]
            shares = "  ".join(f"M{i} {s:.0%}" for i, s in enumerate(r["share"]))
            print(f"{threads:>7}  {malloc:>7}  {r['step_s']:>7.3f}  {args.batch / r['step_s']:>9.1f}  {shares}")
    base = results[("default", 1)]
    print("speed-up over 1 thread, default malloc: " +
          ", ".join(f"{m}/{t}t {base / s:.2f}x" for (m, t), s in results.items()))


if __name__ == "__main__":
    main()
