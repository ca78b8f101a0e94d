"""Memory per in-flight batch: what ``pipeline.in_flight`` costs the producing stage.

    .venv/bin/python benchmarks/in_flight.py [--config configs/smoke.yaml] [--set KEY=VALUE ...]
        [--windows 1 8 32]

Two processes on gloo, as in a pipeline: stage 0 of the config trains and sends its outputs with the real
``Sender``; the consumer takes nothing until the producer has filled its window and blocks on a credit. Then
the producer's resident memory (RSS) is read. Each window size runs in fresh processes; the growth of RSS
per extra in-flight batch is compared with the size of one activation (batch x channels x frames x bytes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, store: str, config: str, overrides: list[str], window: int, out) -> None:
    from vgim_dist.config import load_config  # noqa: PLC0415
    from vgim_dist.data.source import build_source  # noqa: PLC0415
    from vgim_dist.pipeline.transport import Receiver, Sender  # noqa: PLC0415
    from vgim_dist.train.stage import Stage  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    control = dist.new_group(backend="gloo")
    cfg = load_config(config, [*overrides, "run.threads=1"])
    steps = window + 2          # fill the window, then block on a credit
    if rank == 0:
        stage, source = Stage(cfg, 0), build_source(cfg.data, cfg.seed)
        sender = Sender(1, window, control)
        metrics = torch.zeros(3, dtype=torch.float64)
        for step in range(steps):
            x, _ = stage.train_step(source.batch(step))
            if step == window:      # the window is full: this send waits for a credit
                out.put((psutil.Process().memory_info().rss, x.numel() * x.element_size()))
            sender.send(x, metrics)
        sender.close()
        source.close()
    else:
        while out.qsize() == 0:     # hold every credit until the producer has reported
            time.sleep(0.05)
        for _ in Receiver(0, 3, torch.device("cpu"), control):
            pass
    dist.destroy_process_group()


def measure(config: str, overrides: list[str], window: int) -> tuple[int, int]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=worker, args=(r, os.path.join(d, "store"), config, overrides, window, out))
                 for r in (0, 1)]
        for p in procs:
            p.start()
        rss, activation = out.get(timeout=600)
        out.put(None)               # releases the consumer
        for p in procs:
            p.join(timeout=600)
    return rss, activation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    rows = [(w, *measure(args.config, args.overrides, w)) for w in args.windows]
    activation = rows[0][2]
    print(f"{args.config} {' '.join(args.overrides)}: one activation of stage 0 = {activation / 1024:.1f} KiB")
    print(f"{'in_flight':>9}  {'producer RSS MiB':>16}")
    for w, rss, _ in rows:
        print(f"{w:>9}  {rss / 2**20:>16.1f}")
    (w0, r0, _), (w1, r1, _) = rows[0], rows[-1]
    per = (r1 - r0) / (w1 - w0)
    print(f"per extra in-flight batch: {per / 1024:.1f} KiB RSS = {per / activation:.2f} activations")


if __name__ == "__main__":
    sys.exit(main())
