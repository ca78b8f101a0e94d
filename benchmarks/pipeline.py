"""Pipeline throughput against its bounds, all measured in one invocation on one machine.

    .venv/bin/python benchmarks/pipeline.py [--config configs/smoke.yaml] [--stages "[[0], [1, 2, 3]]"]
        [--set KEY=VALUE ...] [--steps 60] [--warmup 10] [--malloc default|tuned]

1. each stage alone, one thread, training on pre-computed inputs: the slowest one bounds the pipeline;
   then all stages at once, each in its own process (no pipeline), which is what they get from the machine
   when every core is busy (on a 2-vCPU VM noticeably less than alone);
2. the pipeline runner (Ray started embedded, one thread per stage);
3. the reference runner with one thread, and with as many threads as the pipeline uses in total.

Runs 2 and 3 are timed from their metrics rows after the first ``--warmup`` steps, which leaves out Ray's
start and the first steps. ``--malloc tuned`` runs everything, Ray's workers included (they inherit this
process's environment), with benchmarks/step_time.py's glibc settings; the default leaves the environment
as it is.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import TUNED_MALLOC

from vgim_dist.config import Config, load_config
from vgim_dist.data.source import build_source
from vgim_dist.launch import train
from vgim_dist.train.metrics import MetricsLog
from vgim_dist.train.stage import Stage


def stage_inputs(cfg: Config, stage: int, distinct: int = 4) -> list[torch.Tensor]:
    """``distinct`` inputs of ``stage``, computed by training the stages before it (the time of a step does
    not depend on the values, so the benchmark cycles through them)."""
    source = build_source(cfg.data, cfg.seed)
    chain = [Stage(cfg, s) for s in range(stage)]
    inputs = []
    for step in range(distinct):
        x = source.batch(step)
        for s in chain:
            x, _ = s.train_step(x)
        inputs.append(x)
    return inputs


def stage_time(cfg: Config, stage: int, steps: int, warmup: int, barrier=None, finished=None) -> float:
    """Seconds per step of ``stage`` training alone on pre-computed inputs, with one thread. With ``barrier``
    and ``finished`` (shared with the other stages' processes), start together and keep stepping until every
    stage has timed its steps, so that all run side by side throughout."""
    torch.set_num_threads(1)
    inputs, s = stage_inputs(cfg, stage), Stage(cfg, stage)
    for step in range(warmup):
        s.train_step(inputs[step % len(inputs)])
    if barrier:
        barrier.wait()
    t0 = time.perf_counter()
    for step in range(steps):
        s.train_step(inputs[step % len(inputs)])
    seconds = (time.perf_counter() - t0) / steps
    if finished:
        with finished.get_lock():
            finished.value += 1
        while finished.value < barrier.parties:
            s.train_step(inputs[0])
    return seconds


def _side_by_side(config: str, overrides: list[str], stage: int, steps: int, warmup: int, barrier, finished,
                  results) -> None:
    results.put((stage, stage_time(load_config(config, overrides), stage, steps, warmup, barrier, finished)))


def stages_together(config: str, overrides: list[str], stages: int, steps: int, warmup: int) -> list[float]:
    """Seconds per step of each stage, all stages training at once in their own processes (no pipeline):
    what the stages get from this machine when all of its cores are busy."""
    ctx = mp.get_context("spawn")
    barrier, finished, results = ctx.Barrier(stages), ctx.Value("i", 0), ctx.Queue()
    procs = [ctx.Process(target=_side_by_side, args=(config, overrides, s, steps, warmup, barrier, finished, results))
             for s in range(stages)]
    for p in procs:
        p.start()
    times = dict(results.get() for _ in procs)
    for p in procs:
        p.join()
    return [times[s] for s in range(stages)]


def run_time(config: str, overrides: list[str], steps: int, warmup: int) -> float:
    """Seconds per step of a whole training run after its first ``warmup`` steps, from its metrics rows."""
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(config, [*overrides, f"run.dir={d}", f"run.steps={warmup + steps}",
                                   f"run.log_every={warmup}", "checkpoint.every=0"])
        train(cfg)
        log = MetricsLog(d, cfg.run.steps)
        log.resume(cfg.run.steps)
    previous, seconds = warmup, 0.0
    for row in log.rows:
        if row["step"] > warmup:
            seconds += row["step_time_s"] * (row["step"] - previous)
            previous = row["step"]
    return seconds / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--stages", default="", help='e.g. "[[0], [1, 2, 3]]" (default: the config\'s)')
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--malloc", choices=("default", "tuned"), default="default")
    ap.add_argument("--replicas", default="", help='also run the pipeline with replicas, e.g. "[2, 1]"')
    args = ap.parse_args()
    if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        # glibc reads these at process start: start again with them (Ray's workers inherit them)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})

    overrides = ["data.uri=noise://", *args.overrides, *([f"pipeline.stages={args.stages}"] if args.stages else [])]
    cfg = load_config(args.config, overrides)
    n = len(cfg.stage_modules())
    batch = cfg.data.batch_size

    alone = [stage_time(cfg, s, args.steps, args.warmup) for s in range(n)]
    together = stages_together(args.config, overrides, n, args.steps, args.warmup)
    pipeline = run_time(args.config, [*overrides, "run.runner=pipeline", "run.threads=1"], args.steps, args.warmup)
    reference = {t: run_time(args.config, [*overrides, "run.runner=reference", f"run.threads={t}"], args.steps,
                             args.warmup) for t in sorted({1, n})}
    replicated = args.replicas and run_time(
        args.config, [*overrides, "run.runner=pipeline", "run.threads=1", f"pipeline.replicas={args.replicas}"],
        args.steps, args.warmup)

    print(f"{args.config} {' '.join(args.overrides)}: stages {cfg.stage_modules()}, batch {batch} x "
          f"{cfg.data.crop} samples, malloc {args.malloc}, {args.steps} steps after {args.warmup}")
    print(f"{'':<30}{'s/step':>8}{'windows/s':>11}")
    total = sum(alone)
    for s, t in enumerate(alone):
        print(f"{f'stage {s} alone, 1 thread':<30}{t:>8.4f}{batch / t:>11.1f}   {t / total:.0%} of the work")
    for s, t in enumerate(together):
        print(f"{f'stage {s} beside the others':<30}{t:>8.4f}{batch / t:>11.1f}")
    print(f"{f'pipeline, {n} x 1 thread':<30}{pipeline:>8.4f}{batch / pipeline:>11.1f}")
    for t, s in reference.items():
        print(f"{f'reference, {t} thread' + 's' * (t > 1):<30}{s:>8.4f}{batch / s:>11.1f}")
    if replicated:
        print(f"{f'pipeline, replicas {args.replicas}':<30}{replicated:>8.4f}{batch / replicated:>11.1f}")
    print(f"pipeline / slowest stage alone: {max(alone) / pipeline:.2f}, beside the others: "
          f"{max(together) / pipeline:.2f}")
    print("pipeline / reference: " + ", ".join(f"{s / pipeline:.2f} ({t} thread{'s' * (t > 1)})"
                                               for t, s in reference.items()))
    if replicated:
        print(f"replicated pipeline / reference, 1 thread: {reference[1] / replicated:.2f}; "
              f"/ pipeline without replicas: {pipeline / replicated:.2f}")


if __name__ == "__main__":
    main()
