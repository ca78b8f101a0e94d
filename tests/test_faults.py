"""Fault injection with the reference runner: a flipped bit or a truncated file in a checkpoint is never loaded
(a resume falls back to the newest intact step, ending bitwise equal to an uninterrupted run, or stops with one
line naming the file); a full disk stops the run at once, naming the path and the free space; a damaged shard
stops it naming the shard and the row."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from vgim_dist.data import readers
from vgim_dist.data.prepare import prepare
from vgim_dist.data.store import Store
from vgim_dist.launch import train
from vgim_dist.storage import StorageFault
from vgim_dist.train.checkpoint import CheckpointManager, LostRun

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


def harm(path: Path, how: str, at: int | None = None) -> None:
    """Damage a file as storage does: cut short, one bit flipped (at byte ``at``, else in the middle), or
    emptied."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "bit-flipped":
        flip_bit(path, len(data) // 2 if at is None else at, bit=0)
    else:
        path.write_bytes(b"")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    train(cfg_for(run, "run.steps=6", "checkpoint.every=2"))
    return run


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "emptied"])
def test_damaged_commit_marker_falls_back_to_the_previous_step(tmp_path, caplog, straight, how):
    run = tmp_path / "run"
    train(cfg_for(run, "run.steps=4", "checkpoint.every=2"))
    damaged = run / "checkpoints" / "step-4" / "checkpoint.json"
    harm(damaged, how)
    with caplog.at_level(logging.WARNING):
        summary = train(cfg_for(run, "run.steps=6", "checkpoint.every=2"), resume=True)
    assert f"{damaged}: commit marker " in caplog.text and "falling back to checkpoint step 2" in caplog.text
    assert summary["steps"] == 6
    assert_bitwise_equal(final_state(run), final_state(straight))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "emptied"])
def test_damaged_metrics_log_resumes_and_says_what_was_lost(tmp_path, caplog, straight, how):
    run = tmp_path / "run"
    train(cfg_for(run, "run.steps=4", "checkpoint.every=2", "run.log_every=1"))
    metrics = run / "metrics.jsonl"
    before = metrics.read_text().splitlines()
    harm(metrics, how, at=len("\n".join(before[:2])) + 1)   # the third row's "{" becomes "z"
    with caplog.at_level(logging.WARNING):
        train(cfg_for(run, "run.steps=6", "checkpoint.every=2", "run.log_every=1"), resume=True)
    assert_bitwise_equal(final_state(run), final_state(straight))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows][-2:] == [5, 6] and [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    kept = [json.dumps(r) for r in rows if r["step"] <= 4]
    assert set(kept) <= set(before)   # every row kept is a row as it was written
    if how == "bit-flipped":
        assert f"{metrics}: 1 damaged lines dropped" in caplog.text


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "emptied"])
def test_damaged_run_identity_is_written_anew_on_resume(tmp_path, caplog, straight, how):
    run = tmp_path / "run"
    train(cfg_for(run, "run.steps=4", "checkpoint.every=2"))
    identity = run / "run.json"
    harm(identity, how)
    with caplog.at_level(logging.WARNING):
        train(cfg_for(run, "run.steps=6", "checkpoint.every=2"), resume=True)
    assert f"{identity}: " in caplog.text and "the run's identity is written anew" in caplog.text
    assert_bitwise_equal(final_state(run), final_state(straight))
    assert json.loads(identity.read_text())["committed"] == 6


def test_commit_marker_damage_that_still_parses_is_caught(tmp_path):
    run = tmp_path / "run"
    train(cfg_for(run, "run.steps=4", "checkpoint.every=2"))
    marker = run / "checkpoints" / "step-4" / "checkpoint.json"
    m = json.loads(marker.read_text())
    m["files"]["module-0.safetensors"]["bytes"] += 1     # still JSON, still a number: caught by the checksum
    marker.write_text(json.dumps(m))
    assert CheckpointManager(str(run)).newest_intact() == 2


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


@pytest.mark.parametrize("loss", ["bucket deleted", "bucket recreated empty"])
def test_a_store_that_loses_the_run_stops_it_naming_what_vanished(s3_endpoint, tmp_path, loss):
    import s3fs

    store = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    bucket = "lost-" + loss.split()[1]
    store.mkdir(bucket)
    run_dir = f"s3://{bucket}/run"
    cfg = cfg_for(run_dir, "run.steps=400", "checkpoint.every=2", "tracking.enabled=false",
                  f"data.endpoint_url={s3_endpoint}")
    seen: dict = {}

    def lose_the_store() -> None:   # the run trains in this thread (it installs signal handlers)
        deadline = time.monotonic() + 120
        while not store.exists(f"{bucket}/run/checkpoints/step-2/checkpoint.json"):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        for _ in range(100):   # the run may write between the deletion of its objects and of the bucket
            try:
                store.rm(bucket, recursive=True)
                break
            except OSError:
                time.sleep(0.05)
        store.invalidate_cache()
        if loss == "bucket recreated empty":
            store.mkdir(bucket)
        seen["lost"] = True

    watcher = threading.Thread(target=lose_the_store, daemon=True)
    watcher.start()
    with pytest.raises(StorageFault) as raised:
        train(cfg)
    watcher.join(timeout=60)
    assert seen.get("lost")
    message = str(raised.value)
    # Whichever it meets first: a write into the missing bucket, a commit that finds the identity gone, or one
    # whose files vanished while the bucket was being emptied.
    assert (message.startswith(f"s3://{bucket}/run/run.json: the run's identity vanished")
            or (message.startswith(f"s3://{bucket}/run/") and f"the bucket s3://{bucket} does not exist" in message)
            or re.match(rf"s3://{bucket}/run/checkpoints/step-\d+: checkpoint step \d+ incomplete, \[.+\] missing "
                        r"or short \(the store lost files this run wrote", message)), message
    store.invalidate_cache()
    if loss == "bucket deleted":
        assert not store.exists(bucket)   # never created again by the run
    else:
        assert not store.exists(f"{bucket}/run/checkpoints/step-2")


def test_resume_refuses_a_store_that_lost_the_newest_commit(tmp_path):
    run = tmp_path / "run"
    train(cfg_for(run, "run.steps=4", "checkpoint.every=2"))
    shutil.rmtree(run / "checkpoints" / "step-4")
    with pytest.raises(LostRun, match=r"step-4: checkpoint step 4, committed by this run, vanished .*newest left: 2"):
        train(cfg_for(run, "run.steps=6", "checkpoint.every=2"), resume=True)


@pytest.mark.slow
def test_an_outage_past_the_wait_names_the_file_and_the_way_on(s3_endpoint, monkeypatch):
    from vgim_dist import storage

    from helpers import free_port

    monkeypatch.setattr(storage, "RETRY_FOR_S", 2.5)
    fs, root = storage.open_dir("s3://runs/r", f"http://127.0.0.1:{free_port()}")   # nothing listens there
    with pytest.raises(StorageFault) as raised:
        storage.write_bytes(fs, f"{root}/checkpoints/step-10/checkpoint.json", b"{}")
    assert str(raised.value).startswith("cannot write s3://runs/r/checkpoints/step-10/checkpoint.json: the store "
                                        "did not answer for 2 s (")
    assert str(raised.value).endswith("what the run committed is kept: continue with --resume once the store is back")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "emptied"])
def test_damaged_tracking_ids_resume_into_new_runs(tmp_path, caplog, how):
    run = tmp_path / "run"
    tracked = (f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "run.steps=2", "checkpoint.every=2")
    train(cfg_for(run, *tracked, "tracking.enabled=true"))
    ids = run / "mlflow.json"
    first = json.loads(ids.read_text())["parent_run_id"]
    harm(ids, how, at=ids.read_text().index(first) + 3)   # a bit of the parent run's id
    with caplog.at_level(logging.WARNING):
        summary = train(cfg_for(run, *tracked[:1], "run.steps=4", "checkpoint.every=2", "tracking.enabled=true"),
                        resume=True)
    assert summary["steps"] == 4
    assert f"tracking: {ids} is damaged (" in caplog.text and "logs into new MLflow runs" in caplog.text
    assert json.loads(ids.read_text())["parent_run_id"] != first
