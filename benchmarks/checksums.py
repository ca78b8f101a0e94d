"""What checksums cost: per checkpoint of the vgim config (its commit and its verified load) and per first read
of a shard and first open of its unpacked cache file, each against the same work without them, measured in one
run.

    python benchmarks/checksums.py [--repeats 5]

Checkpoint: the four modules of configs/vgim.yaml saved to a temporary local run.dir (save_stage + commit),
then loaded back (newest_intact + load_stage), against the time spent hashing in each. Shard: 256
utterances of 4 s of int16 noise in one shard: decoding it, against one checksum of the file (a first read)
and the checksums of all its rows (a re-run of `vgim data prepare`). The process uses one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vgim_dist.config import load_config
from vgim_dist.data.cache import SIDECAR, damage
from vgim_dist.data.shard import SCHEMA, encode, row_checksum
from vgim_dist.storage import checksum
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.stage import Stage


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def checkpoint_costs(repeats: int) -> list[tuple[str, float, float]]:
    cfg = load_config("configs/vgim.yaml", ["run.steps=0"])
    stages = [Stage(cfg, s) for s in range(len(cfg.stage_modules()))]
    with tempfile.TemporaryDirectory() as d:
        ckpt = CheckpointManager(d)
        files = {}
        for stage in stages:
            files.update(ckpt.save_stage(stage, 0))
        ckpt.commit(0, [i for s in stages for i in s.module_ids], files)
        blobs = [Path(ckpt.step_dir(0), n).read_bytes() for n in files]
        size = sum(map(len, blobs))
        hash_s = best(lambda: [checksum(b) for b in blobs], repeats)

        def save() -> None:
            written = {}
            for stage in stages:
                written.update(ckpt.save_stage(stage, 0))
            ckpt.commit(0, [i for s in stages for i in s.module_ids], written)

        def load() -> None:
            ckpt.newest_intact()
            for stage in stages:
                ckpt.load_stage(stage, 0)

        save_s, load_s = best(save, repeats), best(load, repeats)
    return [("checkpoint commit (save_stage + commit)", save_s, hash_s),
            ("checkpoint resume (newest_intact + load_stage)", load_s, 2 * hash_s),
            (f"  ({size / 1e6:.1f} MB, xxh3-64 at {size / hash_s / 1e9:.1f} GB/s)", 0.0, 0.0)]


def shard_costs(repeats: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    n, samples = 256, 4 * 16000
    audio = [(rng.standard_normal(samples) * 3000).astype("<i2").tobytes() for _ in range(n)]
    rows = {"id": [f"u{i:04d}" for i in range(n)], "speaker": ["s"] * n, "labels": ["{}"] * n,
            "length": [samples] * n, "audio": audio}
    assert list(rows) == SCHEMA.names[:-1]
    data = encode(rows, {"fingerprint": "bench"})
    plain = best(lambda: pq.read_table(pa.BufferReader(data)).combine_chunks(), repeats)
    file_hash = best(lambda: checksum(data), repeats)
    table = pq.read_table(pa.BufferReader(data))
    columns = [table.column(c).to_pylist() for c in SCHEMA.names[:-1]]
    row_hashes = best(lambda: [row_checksum(*r) for r in zip(*columns)], repeats)
    with tempfile.TemporaryDirectory() as d:   # the unpacked cache file a training process opens
        cached = Path(d) / "shard.arrow"
        with pa.ipc.new_file(str(cached), table.schema) as w:
            w.write_table(table.combine_chunks())
        cached.with_name(cached.name + SIDECAR).write_text(checksum(cached.read_bytes()))
        open_s = best(lambda: pa.ipc.open_file(pa.memory_map(str(cached))).read_all(), repeats)
        verify_s = best(lambda: damage(cached), repeats)
        assert damage(cached) is None
        mb = cached.stat().st_size / 1e6
    return [(f"shard first read ({len(data) / 1e6:.1f} MB, {n} utterances): decode, + file checksum", plain,
             file_hash),
            ("  the same, + every row's checksum (prepare re-run; data verify on a mismatch)", plain, row_hashes),
            (f"cache file first open ({mb:.1f} MB Arrow): memory-map + read its sidecar, + verify it",
             open_s + verify_s, verify_s)]





def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'':<80} {'total ms':>9} {'checksum ms':>12} {'share':>6}")
    for name, total, extra in checkpoint_costs(a.repeats) + shard_costs(a.repeats):
        if not total:
            print(name)
            continue
        print(f"{name:<80} {1e3 * total:>9.1f} {1e3 * extra:>12.1f} {extra / total:>6.1%}")


if __name__ == "__main__":
    main()
