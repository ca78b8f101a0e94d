"""Shards on a real S3 endpoint over HTTP (moto's server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vgim_dist.data import readers
from vgim_dist.data.config import DataConfig
from vgim_dist.data.loader import ShardSource, iter_utterances
from vgim_dist.data.prepare import prepare
from vgim_dist.data.store import Store

pytestmark = pytest.mark.slow  # `make test` runs it, `make test-fast` skips it


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "vgim_dist", "data", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_prepare_to_s3_reads_back_identical_audio(s3_endpoint, librispeech_dir, tmp_path):
    uri = "s3://corpus/librispeech/v1"
    # The endpoint from the standard AWS variable (a subprocess, as `vgim data prepare` runs)...
    r = _cli("prepare", str(librispeech_dir), "--format", "librispeech", "--out", uri, "--shard-size", "5",
             AWS_ENDPOINT_URL=s3_endpoint)
    assert r.returncode == 0, r.stderr
    prepare(readers.librispeech(librispeech_dir), Store(str(tmp_path / "local")), shard_size=5, log=str)
    # ... and from the config value, when reading.
    remote = list(iter_utterances(uri, "train", endpoint_url=s3_endpoint, cache_dir=str(tmp_path / "cache")))
    local = list(iter_utterances(str(tmp_path / "local"), "train", cache_dir=str(tmp_path / "cache")))
    assert len(remote) == len(local) >= 10 and [u.id for u in remote] == [u.id for u in local]
    assert all(np.array_equal(a.audio, b.audio) and a.labels == b.labels for a, b in zip(remote, local))

    cfg = DataConfig(uri=uri, endpoint_url=s3_endpoint, cache_dir=str(tmp_path / "cache2"), batch_size=8)
    remote_src = ShardSource(cfg, seed=3)
    local_src = ShardSource(DataConfig(uri=str(tmp_path / "local"), cache_dir=str(tmp_path / "cache"),
                                       batch_size=8), seed=3)
    try:
        assert torch.equal(remote_src.batch(11), local_src.batch(11))
    finally:
        remote_src.close()
        local_src.close()


def test_unreachable_store_fails_fast_and_clearly(s3_endpoint, deboer_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    t = time.monotonic()
    r = _cli("prepare", str(deboer_dir), "--format", "deboer", "--out", "s3://corpus/x", "--endpoint-url", dead)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("vgim: cannot reach s3://corpus/x")
    assert "cannot reach s3://corpus/x" in r.stderr and dead in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t < 60
