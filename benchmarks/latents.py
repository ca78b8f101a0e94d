"""What latent shards cost and buy (docs/latents.md, docs/performance.md), all from one invocation:

    .venv/bin/python benchmarks/latents.py [--config configs/vgim.yaml] [--batch 8] [--crop 20480] [--steps 4]
                                           [--threads 1 2] [--seconds 60]
    .venv/bin/python benchmarks/latents.py --storage-only      # bytes per hour only: no timing

1. Step: modules 1..N-1 trained from module-0 latent shards (float32, mean and log-variance) against the full
   reference step (every module from audio shards), each in a fresh process at the same thread count and
   allocator settings (step_time.py's "tuned" malloc), the data read included. Goal: <= 0.5x.
2. Peak memory (ru_maxrss) of those two processes.
3. Encode throughput: seconds of audio encoded per second per core (one process, one torch thread).
4. Bytes per hour of audio, per module and dtype: the raw arrays (frames per hour x width x bytes per value)
   and the zstd Parquet shards `vgim encode` wrote over the benchmark's audio.

The audio is seeded tones in noise (``--seconds`` of it in 4 s utterances), the encoder the config's
step-0 initialisation: what is measured depends on the shapes, not on what was learned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from step_time import TUNED_MALLOC, step_args

DTYPES = ("float32", "bfloat16", "float16")


def setup(work: Path, config: str, seconds: float) -> dict:
    """Audio shards of ``seconds`` of audio and a step-0 run of ``config`` (its initial weights)."""
    from vgim_dist.config import load_config  # noqa: PLC0415
    from vgim_dist.data import readers  # noqa: PLC0415
    from vgim_dist.data.prepare import prepare  # noqa: PLC0415
    from vgim_dist.data.store import Store  # noqa: PLC0415
    from vgim_dist.launch import train  # noqa: PLC0415

    from helpers import noise_corpus  # noqa: PLC0415 - the tests' corpus maker

    audio, run = work / "audio", work / "run"
    if not (audio / "manifest.json").exists():
        corpus = noise_corpus(work / "corpus", [64000] * max(1, round(seconds / 4)))
        prepare(readers.folder(corpus), Store(str(audio)), shard_size=64, log=lambda _line: None)
    if not (run / "summary.json").exists():
        train(load_config(config, [f"run.dir={run}", "run.steps=0", "tracking.enabled=false", "pipeline.stages=[]",
                                   "data.uri=noise://", "run.threads=1"]))
    return {"audio": str(audio), "run": str(run)}


def measure_step(config: str, data: str, upper: bool, batch: int, crop: int, steps: int, threads: int) -> dict:
    """Child process: seconds per step (batch read + every trained module's step) and peak RSS."""
    import torch  # noqa: PLC0415

    from vgim_dist.config import load_config  # noqa: PLC0415
    from vgim_dist.launch import absolute_paths  # noqa: PLC0415
    from vgim_dist.train.lower import resolve_lower, train_source  # noqa: PLC0415
    from vgim_dist.train.stage import Stage  # noqa: PLC0415

    torch.set_num_threads(threads)
    cfg = absolute_paths(load_config(config, [f"data.batch_size={batch}", f"data.crop={crop}", f"data.uri={data}",
                                              "pipeline.stages=[]", "data.prefetch=0"]))
    if upper:
        resolve_lower(cfg)
    stage, source = Stage(cfg, 0), train_source(cfg.data, cfg.seed)
    elapsed = 0.0
    for step in range(steps + 1):                           # step 0 warms up
        t = time.perf_counter()
        stage.train_step(source.batch(step))
        if step:
            elapsed += time.perf_counter() - t
    source.close()
    return {"step_s": elapsed / steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(args: argparse.Namespace, data: str, upper: bool, threads: int) -> dict:
    env = {**os.environ, **TUNED_MALLOC}
    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--batch", str(args.batch), "--crop",
                          str(args.crop), "--steps", str(args.steps), "--child", data, "--child-threads", str(threads)]
                         + (["--child-upper"] if upper else []), env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def encode_all(work: Path, paths: dict, n_modules: int) -> tuple[dict, float, float]:
    """Every module's shards in every dtype: bytes per audio hour measured, module 0's encode throughput."""
    import torch  # noqa: PLC0415

    from vgim_dist.encode import encode  # noqa: PLC0415

    torch.set_num_threads(1)
    measured, rate, hours = {}, 0.0, 0.0
    for module in range(n_modules):
        for dtype in DTYPES:
            out = work / f"m{module}-{dtype}"
            t = time.perf_counter()
            m = encode(paths["run"], module, paths["audio"], str(out), dtype=dtype, log=lambda _line: None)
            wall = time.perf_counter() - t
            frames = sum(s["frames"] for s in m["splits"].values())
            stored = sum(s["bytes"] for split in m["splits"].values() for s in split["shards"])
            hours = frames * m["hop"] / 16000 / 3600
            measured[(module, dtype)] = stored / hours
            if (module, dtype) == (0, "float32"):
                rate = hours * 3600 / wall     # seconds of audio per second, on one core
    return measured, rate, hours


def main() -> None:
    ap = step_args(__doc__)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=60.0, help="audio encoded for the storage and throughput "
                    "figures, and read by the step measurements")
    ap.add_argument("--work", default="", help="keep the audio, run and shards here (default: a temporary folder)")
    ap.add_argument("--storage-only", action="store_true", help="bytes per hour only (no timing)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)       # child process mode: the data
    ap.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child-upper", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_step(args.config, args.child, args.child_upper, args.batch, args.crop, args.steps,
                                      args.child_threads)))
        return

    from vgim_dist.config import load_config  # noqa: PLC0415
    from vgim_dist.data.latents import DTYPES as TORCH_DTYPES, parts  # noqa: PLC0415
    from vgim_dist.model import describe  # noqa: PLC0415

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = setup(work, args.config, args.seconds)
        n = len(cfg.model.modules)
        measured, rate, hours = encode_all(work, paths, n)
        print(f"{args.config}: {hours * 3600:.0f} s of audio; bytes per hour of audio (raw arrays | zstd Parquet "
              "shards as written)")
        print(f"{'module':>6}  {'hop':>4}  {'width':>5}  " + "  ".join(f"{d:>19}" for d in DTYPES))
        for k, row in enumerate(describe(cfg.model, 16000)):
            width = row["channels"] * parts(cfg.model, k, "params")
            raw = {d: 3600 * 16000 / row["hop"] * width * TORCH_DTYPES[d].itemsize for d in DTYPES}
            print(f"{k:>6}  {row['hop']:>4}  {width:>5}  " + "  ".join(
                f"{raw[d] / 1e9:>7.2f} | {measured[(k, d)] / 1e9:>6.2f} GB" for d in DTYPES))
        print(f"encode throughput (module 0, float32, 1 thread): {rate:.1f} s of audio per second per core")
        if args.storage_only:
            return
        print(f"step, batch {args.batch} x {args.crop} samples, mean of {args.steps} steps after one warm-up, "
              f"tuned malloc, data read included")
        print(f"{'threads':>7}  {'full s/step':>11}  {'upper s/step':>12}  {'ratio':>6}  {'full MB':>8}  "
              f"{'upper MB':>8}")
        for threads in args.threads:
            full = _child(args, paths["audio"], False, threads)
            upper = _child(args, str(work / "m0-float32"), True, threads)
            print(f"{threads:>7}  {full['step_s']:>11.3f}  {upper['step_s']:>12.3f}  "
                  f"{upper['step_s'] / full['step_s']:>5.2f}x  {full['peak_rss_mb']:>8.0f}  "
                  f"{upper['peak_rss_mb']:>8.0f}")


if __name__ == "__main__":
    main()
