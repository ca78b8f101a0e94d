"""Crop batches: a pure function of (seed, step), in any process and any call order; prefetch; short clips."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from vgim_dist.data import readers
from vgim_dist.data.config import DataConfig
from vgim_dist.data.loader import ShardSource, iter_utterances
from vgim_dist.data.prepare import prepare
from vgim_dist.data.source import build_source
from vgim_dist.data.store import Store, StoreError


@pytest.fixture(scope="module")
def shards(librispeech_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "ls"
    prepare(readers.librispeech(librispeech_dir), Store(str(out)), shard_size=4, log=str)
    return str(out)


@pytest.fixture
def make(shards, tmp_path):
    made = []

    def make(seed=0, **kw):
        kw = {"uri": shards, "cache_dir": str(tmp_path / "cache"), "batch_size": 6, "crop": 8000, **kw}
        made.append(build_source(DataConfig(**kw), seed))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


def test_batches_are_crops_of_the_corpus_on_the_grid(make, shards, tmp_path):
    src = make(seed=1, grid=160)
    assert isinstance(src, ShardSource)
    x = src.batch(4)
    assert x.shape == (6, 1, 8000) and x.dtype == torch.float32
    assert x.abs().max() <= 1.0 and x.std() > 0.01
    audio = [u.audio for u in iter_utterances(shards, "train", cache_dir=str(tmp_path / "cache"))]
    utts, offsets = src.plan(4)
    assert (offsets % 160 == 0).all() and len(set(utts.tolist())) > 1
    for row, u, off in zip(x[:, 0].numpy(), utts, offsets):
        assert off + 8000 <= len(audio[u]) and np.array_equal(row, audio[u][off:off + 8000])


def test_same_seed_and_step_same_batch_in_any_order(make):
    a, b = make(seed=7, prefetch=0), make(seed=7, prefetch=3)
    forward = [_digest(a.batch(s)) for s in range(6)]
    shuffled = {s: _digest(b.batch(s)) for s in (5, 0, 1, 2, 4, 3)}  # jumps defeat the prefetch window
    assert forward == [shuffled[s] for s in range(6)]
    assert len(set(forward)) == 6  # steps differ
    assert _digest(make(seed=8).batch(0)) != forward[0]  # seeds differ


@pytest.mark.slow
def test_same_batches_in_another_process(make, shards, tmp_path):
    here = [_digest(make(seed=5, prefetch=0).batch(s)) for s in (0, 1, 9)]
    code = (
        "import hashlib, json, sys\n"
        "from vgim_dist.data.config import DataConfig\n"
        "from vgim_dist.data.source import build_source\n"
        f"src = build_source(DataConfig(uri={shards!r}, cache_dir={str(tmp_path / 'other')!r}, batch_size=6, "
        "crop=8000, prefetch=2), 5)\n"
        "out = {s: hashlib.sha256(src.batch(s).numpy().tobytes()).hexdigest() for s in (9, 1, 0)}\n"
        "src.close()\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert r.returncode == 0, r.stderr
    there = json.loads(r.stdout)
    assert [there[str(s)] for s in (0, 1, 9)] == here


def test_short_clips_skipped_or_padded(make, shards, tmp_path):
    audio = [u.audio for u in iter_utterances(shards, "train", cache_dir=str(tmp_path / "cache"))]
    lengths = [len(a) for a in audio]
    crop = sorted(lengths)[len(lengths) // 2]  # half the clips are shorter than this
    skip = make(seed=2, crop=crop, short="skip", batch_size=32, prefetch=0)
    assert skip.n_short == sum(n < crop for n in lengths) > 0
    utts, _ = skip.plan(0)
    assert all(lengths[u] >= crop for u in utts)

    pad = make(seed=2, crop=crop, short="pad", batch_size=32, prefetch=0)
    utts, offsets = pad.plan(0)
    x = pad.batch(0)[:, 0]
    short = [i for i, u in enumerate(utts) if lengths[u] < crop]
    assert short, "seeded draw should include a short clip"
    for i in short:  # the whole clip, then zeros
        n = lengths[utts[i]]
        assert offsets[i] == 0 and np.array_equal(x[i, :n].numpy(), audio[utts[i]]) and x[i, n:].abs().sum() == 0

    with pytest.raises(ValueError, match="data.short=pad"):
        make(crop=max(lengths) + 1, short="skip")


def test_prefetch_runs_ahead_and_close_stops_it(make):
    src = make(seed=3, prefetch=2)
    src.batch(0)
    assert sorted(src._ahead) == [1, 2]
    assert any(t.name.startswith("vgim-prefetch") for t in threading.enumerate())
    src.close()
    assert not any(t.name.startswith("vgim-prefetch") for t in threading.enumerate())


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        list(iter_utterances(str(tmp_path), "train"))


def _rot(path, every: int = 997) -> None:
    """Flip one bit every ``every`` KiB or so, all through the file: bit rot that no decoder would notice."""
    data = bytearray(path.read_bytes())
    for at in range(100, len(data), every * 1024 // 7):
        data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm", ["bit rot", "truncated", "no sidecar"])
def test_a_damaged_shard_cache_file_is_discarded_and_unpacked_again(make, tmp_path, caplog, harm):
    clean = make(seed=3)
    want = [_digest(clean.batch(s)) for s in range(4)]
    clean.close()
    files = sorted((tmp_path / "cache").rglob("*.arrow"))
    assert files
    for f in files:
        if harm == "bit rot":
            _rot(f)
        elif harm == "truncated":
            f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
        else:
            f.with_name(f.name + ".xxh3").unlink()
    caplog.set_level("WARNING", logger="vgim_dist.data.cache")
    again = make(seed=3)
    assert [_digest(again.batch(s)) for s in range(4)] == want
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(files), warned
    reason = {"bit rot": "checksum mismatch", "truncated": "checksum mismatch", "no sidecar": "no recorded checksum"}
    assert all(w.startswith(f"shard cache {tmp_path / 'cache'}") and reason[harm] in w and "unpacked again" in w
               for w in warned), warned


def test_verify_names_a_damaged_shard_cache_file(make, shards, tmp_path):
    make().close()
    rotten = sorted((tmp_path / "cache").rglob("*.arrow"))[1]
    _rot(rotten)
    verify = [sys.executable, "-m", "vgim_dist", "data", "verify", shards, "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shard cache {rotten}: checksum mismatch"), lines
    assert lines[0].endswith("(removed; unpacked again from " + shards + "/"
                             + rotten.name.rsplit("-", 1)[0] + ".parquet on the next read)"), lines
    assert not rotten.exists()
    r = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all intact" in r.stdout, r.stdout + r.stderr
