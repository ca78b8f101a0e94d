"""Loader throughput: windows per second on one core, from local shards, from S3 shards, and with the
published code's approach (decode the whole file with soundfile, then crop), on the same corpus.

    python benchmarks/loader.py [--corpus LIBRISPEECH_DIR] [--batches 40]

Without ``--corpus`` a LibriSpeech-layout corpus is synthesised with espeak-ng. The S3 figures use a
moto server on 127.0.0.1. The process is pinned to one core and torch to one thread.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from vgim_dist.data import readers
from vgim_dist.data.config import DataConfig
from vgim_dist.data.loader import ShardSource
from vgim_dist.data.prepare import prepare
from vgim_dist.data.store import Store
from vgim_dist.data.synth import synth_librispeech


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def shard_rate(cfg: DataConfig, batches: int) -> tuple[float, float]:
    """(seconds to open, including download and unpacking into the cache; windows per second)."""
    t = time.perf_counter()
    src = ShardSource(cfg, seed=0)
    opened = time.perf_counter() - t
    src.batch(0)
    t = time.perf_counter()
    for step in range(1, batches + 1):
        src.batch(step)
    rate = batches * cfg.batch_size / (time.perf_counter() - t)
    src.close()
    return opened, rate


def decode_then_crop_rate(cfg: DataConfig, paths: list[Path], batches: int) -> float:
    """The published approach: read the whole file for every window, then take a random crop."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(batches):
        out = np.empty((cfg.batch_size, cfg.crop), np.float32)
        for row in out:
            x, _ = sf.read(paths[rng.integers(len(paths))], dtype="float32")
            off = rng.integers((len(x) - cfg.crop) // cfg.grid + 1) * cfg.grid
            row[:] = x[off:off + cfg.crop]
        torch.from_numpy(out).unsqueeze(1)
    return batches * cfg.batch_size / (time.perf_counter() - t)


def prefetch_wait(cfg: DataConfig, prefetch: int, step_s: float, steps: int) -> float:
    """Mean seconds per step a trainer waits for its batch when each step computes for ``step_s``."""
    src = ShardSource(DataConfig(**{**cfg.__dict__, "prefetch": prefetch}), seed=1)
    waited = 0.0
    for step in range(steps):
        t = time.perf_counter()
        src.batch(step)
        waited += time.perf_counter() - t
        time.sleep(step_s)  # the training step (on a GPU the CPU is mostly idle meanwhile)
    src.close()
    return waited / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="LibriSpeech-layout folder (default: synthesise one)")
    ap.add_argument("--speakers", type=int, default=8)
    ap.add_argument("--utterances", type=int, default=25, help="per speaker, when synthesising")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--crop", type=int, default=20480)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vgim-bench-") as tmp:
        run(a, Path(tmp))


def run(a: argparse.Namespace, work: Path) -> None:
    corpus_dir = a.corpus or work / "corpus"
    if a.corpus is None:
        synth_librispeech(corpus_dir, speakers=a.speakers, utterances=a.utterances, seed=0)
    corpus = readers.librispeech(corpus_dir)
    paths = [it.path for it in corpus.items if it.split == "train" and sf.info(it.path).frames >= a.crop]
    local = work / "shards"
    m = prepare(corpus, Store(str(local)), log=lambda _: None)
    print(f"corpus: {m['splits']['train']['utterances']} train utterances, "
          f"{m['splits']['train']['seconds'] / 60:.1f} min; crop {a.crop}, batch {a.batch_size}, one core")

    cfg = DataConfig(uri=str(local), cache_dir=str(work / "cache"), batch_size=a.batch_size, crop=a.crop,
                     prefetch=0)
    rows = []
    opened, rate = shard_rate(cfg, a.batches)
    rows.append(("local shards (first open: unpack into cache)", opened, rate))
    opened, rate = shard_rate(cfg, a.batches)
    rows.append(("local shards (cached)", opened, rate))

    proc, endpoint = moto_server()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        prepare(corpus, Store("s3://bench/shards", endpoint), log=lambda _: None)
        s3 = DataConfig(**{**cfg.__dict__, "uri": "s3://bench/shards", "endpoint_url": endpoint,
                           "cache_dir": str(work / "s3cache")})
        opened, rate = shard_rate(s3, a.batches)
        rows.append(("S3 shards (first open: download + unpack)", opened, rate))
        opened, rate = shard_rate(s3, a.batches)
        rows.append(("S3 shards (cached)", opened, rate))
    finally:
        proc.terminate()

    baseline = decode_then_crop_rate(cfg, paths, max(2, a.batches // 8))
    rows.append(("decode whole file, then crop (published code)", float("nan"), baseline))

    print("| source | open s | windows/s/core | x decode-then-crop |\n|---|---|---|---|")
    for name, opened, rate in rows:
        print(f"| {name} | {'-' if np.isnan(opened) else f'{opened:.2f}'} | {rate:,.0f} | {rate / baseline:.1f} |")

    step_s = 0.02
    print(f"\nprefetch, trainer step of {step_s * 1000:.0f} ms: mean wait for a batch per step")
    for n in (0, 2):
        print(f"  prefetch={n}: {prefetch_wait(cfg, n, step_s, 30) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
