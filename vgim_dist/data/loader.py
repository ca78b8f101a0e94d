"""Reading shards: random crops as a pure function of (seed, step), and full utterances for evaluation.

On open, each shard of a split is read once (downloaded, for remote shards), verified against the checksum
``manifest.json`` records for it, unpacked into an uncompressed Arrow IPC file under the cache directory and
memory-mapped; a damaged shard stops the read with an error naming the shard and the row. The audio column's
data buffer is then one int16 array per shard, so a crop is a numpy slice plus an int16 -> float32 conversion.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from vgim_dist.data.audio import SCALE
from vgim_dist.data.cache import cache_dir_for, unpacked
from vgim_dist.data.config import DataConfig
from vgim_dist.data.shard import MANIFEST
from vgim_dist.data.store import Store, StoreError
from vgim_dist.seeding import derive_seed


def read_manifest(store: Store) -> dict:
    try:
        return json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise StoreError(f"no {MANIFEST} in {store}: run `vgim data prepare` first") from None


@dataclass
class Utterance:
    id: str
    speaker: str
    labels: dict
    audio: np.ndarray  # float32 in [-1, 1], 16 kHz


class Split:
    """All rows of one split, memory-mapped: row u's data is ``data[shard_of[u]][start[u]:start[u] + size[u]]``
    (bytes). Audio shards: ``pcm16(u)``, ``length`` in samples; latent shards (``column="latent"``,
    ``length_column="frames"``): ``length`` in frames."""

    def __init__(self, uri: str, split: str, endpoint_url: str = "", cache_dir: str = "", column: str = "audio",
                 length_column: str = "length"):
        store = Store(uri, endpoint_url)
        self.manifest = read_manifest(store)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {store}; it has {sorted(self.manifest['splits'])}")
        cache = cache_dir_for(store, cache_dir)

        self.tables: list[pa.Table] = []  # keep the memory maps alive
        self.data: list[np.ndarray] = []
        shard_of, start, size, length = [], [], [], []
        shards = [s for s in self.manifest["splits"][split]["shards"] if s["utterances"]]
        for i, shard in enumerate(shards):
            table = pa.ipc.open_file(pa.memory_map(str(unpacked(store, shard, cache)))).read_all()
            rows = table.column(column).chunk(0)
            offsets = np.frombuffer(rows.buffers()[1], np.int64)[rows.offset:rows.offset + len(rows) + 1]
            self.tables.append(table)
            self.data.append(np.frombuffer(rows.buffers()[2], np.uint8))
            shard_of.append(np.full(len(rows), i, np.int32))
            start.append(offsets[:-1])
            size.append(np.diff(offsets))
            length.append(table.column(length_column).to_numpy())
        self.shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self.start = np.concatenate(start) if start else np.zeros(0, np.int64)
        self.size = np.concatenate(size) if size else np.zeros(0, np.int64)
        self.length = np.concatenate(length) if length else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.length)

    def row(self, u: int) -> np.ndarray:
        """Row ``u``'s data, as bytes (uint8), without a copy."""
        s = self.start[u]
        return self.data[self.shard_of[u]][s:s + self.size[u]]

    def pcm16(self, u: int) -> np.ndarray:
        return self.row(u).view(np.int16)


def eligible(length: np.ndarray, crop: int, short: str) -> np.ndarray:
    """The rows a crop of ``crop`` may come from: every row with ``short=pad``, else those at least a crop long."""
    return np.arange(len(length)) if short == "pad" else np.flatnonzero(length >= crop)


def crop_plan(seed: int, step: int, rows: np.ndarray, length: np.ndarray, batch_size: int, crop: int,
              grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, crop offset) of every window of step ``step``'s batch: rows drawn uniformly from ``rows`` (with
    replacement), each crop starting at a random multiple of ``grid``; a pure function of (seed, step). The
    same draw for audio (samples) and latent shards (frames)."""
    rng = np.random.default_rng(derive_seed(seed, "crops", step))
    utts = rows[rng.integers(len(rows), size=batch_size)]
    slots = np.maximum(length[utts] - crop, 0) // grid + 1
    return utts, rng.integers(slots) * grid


def iter_utterances(uri: str, split: str, endpoint_url: str = "", cache_dir: str = "") -> Iterator[Utterance]:
    """Every utterance of ``split`` in a fixed order (shard, then id), whole and unshuffled: for evaluation."""
    s = Split(uri, split, endpoint_url, cache_dir)
    u = 0
    for table in s.tables:
        for id_, speaker, labels in zip(*(table.column(c).to_pylist() for c in ("id", "speaker", "labels"))):
            yield Utterance(id_, speaker, json.loads(labels), s.pcm16(u).astype(np.float32) / SCALE)
            u += 1


class ShardSource:
    """Training batches of random crops from shards; ``batch(step)`` depends only on (seed, step).

    Utterances are drawn uniformly (with replacement) and each crop starts at a random multiple of
    ``grid``. Utterances shorter than a crop are left out (``short=skip``) or zero-padded at the end
    (``short=pad``). A background thread builds the next ``prefetch`` steps; a caller that jumps to
    another step simply gets it computed on the spot, with the same values.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.data = Split(cfg.uri, cfg.split, cfg.endpoint_url, cfg.cache_dir)
        self.eligible = eligible(self.data.length, cfg.crop, cfg.short)
        self.n_short = int((self.data.length < cfg.crop).sum())
        if len(self.eligible) == 0:
            raise ValueError(f"no utterance in split {cfg.split!r} of {cfg.uri} is {cfg.crop} samples long; "
                             f"use data.short=pad or a smaller data.crop")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vgim-prefetch") if cfg.prefetch else None
        self._ahead: dict[int, Future] = {}

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(utterance index, crop offset) of every window in the batch for ``step``."""
        return crop_plan(self.seed, step, self.eligible, self.data.length, self.cfg.batch_size, self.cfg.crop,
                         self.cfg.grid)

    def _build(self, step: int) -> torch.Tensor:
        out = np.zeros((self.cfg.batch_size, self.cfg.crop), np.float32)
        for row, u, off in zip(out, *self.plan(step)):
            clip = self.data.pcm16(u)[off:off + self.cfg.crop]
            row[:len(clip)] = clip
        out *= 1.0 / SCALE
        return torch.from_numpy(out).unsqueeze(1)

    def batch(self, step: int) -> torch.Tensor:
        fut = self._ahead.pop(step, None)
        out = fut.result() if fut is not None else self._build(step)
        if self._pool is not None:
            window = range(step + 1, step + 1 + self.cfg.prefetch)
            for s in [s for s in self._ahead if s not in window]:  # the caller moved elsewhere
                self._ahead.pop(s).cancel()
            for s in window:
                if s not in self._ahead:
                    self._ahead[s] = self._pool.submit(self._build, s)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, {}
