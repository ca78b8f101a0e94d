"""Fault injection with the reference runner: a flipped bit or a truncated file in a checkpoint is never loaded
(a resume falls back to the newest intact step, ending bitwise equal to an uninterrupted run, or stops with one
line naming the file); a full disk stops the run at once, naming the path and the free space; a damaged shard
stops it naming the shard and the row."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from vgim_dist.data import readers
from vgim_dist.data.prepare import prepare
from vgim_dist.data.store import Store
from vgim_dist.launch import train
from vgim_dist.train.checkpoint import CheckpointManager

from helpers import assert_bitwise_equal, cfg_for, final_state, run_cli


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def tensor_offset(path: Path) -> int:
    """A byte inside the tensor data of a safetensors file (past its JSON header)."""
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return 8 + header + (path.stat().st_size - 8 - header) // 2


def test_flipped_bit_in_a_checkpoint_tensor_falls_back_to_the_previous_step(tmp_path, caplog):
    train(cfg_for(tmp_path / "straight", "run.steps=6", "checkpoint.every=2"))
    run = tmp_path / "flipped"
    train(cfg_for(run, "run.steps=4", "checkpoint.every=2"))
    damaged = run / "checkpoints" / "step-4" / "module-1.safetensors"
    flip_bit(damaged, tensor_offset(damaged), bit=3)
    with caplog.at_level(logging.WARNING):
        summary = train(cfg_for(run, "run.steps=6", "checkpoint.every=2"), resume=True)
    assert f"{damaged}: checksum mismatch" in caplog.text and "falling back to checkpoint step 2" in caplog.text
    assert summary["steps"] == 6
    assert_bitwise_equal(final_state(run), final_state(tmp_path / "straight"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


@pytest.mark.slow
def test_truncated_only_checkpoint_stops_with_one_line_naming_it(tmp_path):
    sets = [a for s in ["data.crop=2560", "data.batch_size=4", "run.threads=1", f"run.dir={tmp_path}"]
            for a in ("--set", s)]
    assert run_cli(*sets, "--set", "run.steps=2").returncode == 0
    damaged = tmp_path / "checkpoints" / "step-2" / "module-0.train.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    resumed = run_cli(*sets, "--set", "run.steps=4", "--resume")
    assert resumed.returncode == 1
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vgim: {damaged}: ") and "(truncated?)" in last, resumed.stderr
    assert "Traceback" not in resumed.stderr


@pytest.mark.slow
def test_full_disk_stops_at_once_naming_the_path_and_leaves_no_temporary_file(small_disk):
    sets = [a for s in ["data.crop=2560", "data.batch_size=4", "run.threads=1", f"run.dir={small_disk}",
                        "tracking.enabled=false", "run.steps=6", "checkpoint.every=2"] for a in ("--set", s)]
    run = run_cli(*sets, timeout=120)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"vgim: {small_disk}/checkpoints/step-4/\S+: no space left on device "
                        r"\([\d,]+ bytes free of [\d,]+; [\d,]+ needed\)", last), run.stderr
    assert "Traceback" not in run.stderr
    assert not [p for p in small_disk.rglob("*") if ".tmp-" in p.name]
    assert CheckpointManager(str(small_disk)).newest_intact() == 2


@pytest.mark.slow
def test_damaged_shard_stops_training_with_one_line_naming_shard_and_row(librispeech_dir, tmp_path):
    shards = tmp_path / "shards"
    prepare(readers.librispeech(librispeech_dir), Store(str(shards)), log=lambda _line: None)
    damaged = shards / "train-00000.parquet"
    footer = int.from_bytes(damaged.read_bytes()[-8:-4], "little")
    flip_bit(damaged, (damaged.stat().st_size - 8 - footer) // 2)
    run = run_cli("--set", f"run.dir={tmp_path / 'run'}", "--set", f"data.uri={shards}", "--set",
                  f"data.cache_dir={tmp_path / 'cache'}", "--set", "run.steps=2", timeout=120)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"vgim: shard {shards}/train-00000\.parquet: row \d+ \(id '[\w-]+'\) does not match "
                        "its checksum", last), run.stderr
