"""Shards: exact round trip, bad input named in the manifest, resume after an interruption."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from vgim_dist.cli import main as vgim_main
from vgim_dist.data import prepare as prepare_mod, readers
from vgim_dist.data.loader import iter_utterances
from vgim_dist.data.prepare import PrepareError, prepare
from vgim_dist.data.shard import CorruptShard
from vgim_dist.data.store import Store


def _quiet(_msg: str) -> None:
    pass


def test_round_trip_is_exact_and_ordered(librispeech_dir, tmp_path):
    corpus = readers.librispeech(librispeech_dir)
    m = prepare(corpus, Store(str(tmp_path / "shards")), shard_size=4, log=_quiet)
    assert m["utterances"] == 18 and m["corpus"]["split_rule"] == "split files" and not m["skipped"]
    assert len(m["splits"]["train"]["shards"]) == 3  # 12 train utterances (2 of 6 per speaker to test) in chunks of 4
    by_id = {it.id: it for it in corpus.items}
    for split in ("train", "test"):
        got = list(iter_utterances(str(tmp_path / "shards"), split, cache_dir=str(tmp_path / "cache")))
        assert [u.id for u in got] == sorted(it.id for it in corpus.items if it.split == split)
        for u in got:  # 16-bit 16 kHz sources come back bit for bit
            ref, _ = sf.read(by_id[u.id].path, dtype="float32")
            assert u.audio.dtype == np.float32 and np.array_equal(u.audio, ref)
            assert u.speaker == by_id[u.id].speaker and u.labels == by_id[u.id].labels
        assert m["splits"][split]["samples"] == sum(len(u.audio) for u in got)


def _bad_corpus(root, good_src):
    """Good clips plus one of every kind of bad input."""
    good = sorted(good_src.rglob("*.flac"))[:4]
    for p in good:
        shutil.copy(p, root / p.name)
    x, _ = sf.read(good[0], dtype="float32")
    sf.write(root / "stereo.wav", np.stack([x, 0.5 * x], 1), 16000, subtype="PCM_16")
    x44 = np.interp(np.arange(round(len(x) * 44100 / 16000)) * 16000 / 44100, np.arange(len(x)), x)
    sf.write(root / "rate44k.wav", x44, 44100, subtype="PCM_16")
    (root / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really a wave file")
    (root / "zero_bytes.flac").write_bytes(b"")
    sf.write(root / "no_frames.wav", np.zeros(0, np.float32), 16000)
    nan = x.copy()
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    inf = x.copy()
    inf[5] = np.inf
    sf.write(root / "inf.wav", inf, 16000, subtype="FLOAT")
    sf.write(root / "tiny.wav", x[:800], 16000, subtype="PCM_16")
    return [p.stem for p in good]


def test_bad_files_are_named_and_good_ones_kept(librispeech_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = _bad_corpus(src, librispeech_dir)
    m = prepare(readers.folder(src), Store(str(tmp_path / "out")), shard_size=3, min_samples=1600, log=_quiet)
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == ["garbage", "inf", "nan", "no_frames", "tiny", "zero_bytes"]
    assert reasons["garbage"].startswith("unreadable") and reasons["zero_bytes"].startswith("unreadable")
    assert reasons["no_frames"].startswith("empty")
    assert reasons["nan"] == reasons["inf"] == "non-finite samples (NaN or inf)"
    assert reasons["tiny"] == "too short: 800 samples < 1600"
    assert m["fixes"] == {"mixed_down": 1, "resampled": 1}
    kept = {u.id: u for u in iter_utterances(str(tmp_path / "out"), "train", cache_dir=str(tmp_path / "c"))}
    assert sorted(kept) == sorted(good + ["rate44k", "stereo"])
    ref, _ = sf.read(sorted(librispeech_dir.rglob("*.flac"))[0], dtype="float32")
    np.testing.assert_allclose(kept["stereo"].audio, 0.75 * ref, atol=1 / 32768)  # mean of the channels
    back = kept["rate44k"].audio  # 44.1 kHz -> 16 kHz: the same signal again
    assert abs(len(back) - len(ref)) <= 1 and np.corrcoef(back[:len(ref)], ref[:len(back)])[0, 1] > 0.95


def test_repaired_files_are_named_in_the_manifest(librispeech_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = sorted(librispeech_dir.rglob("*.flac"))[:2]
    for p in good:
        shutil.copy(p, src / p.name)
    x, _ = sf.read(good[0], dtype="float32")
    sf.write(src / "stereo.wav", np.stack([x, 0.5 * x], 1), 16000, subtype="PCM_16")
    sf.write(src / "phone8k.wav", x[::2], 8000, subtype="PCM_16")
    sf.write(src / "both.flac", np.stack([x[::2], x[::2]], 1), 8000, subtype="PCM_16")
    sf.write(src / "loud.wav", 1.5 * x, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    m = prepare(readers.folder(src), Store(str(out)), shard_size=2, log=_quiet)
    assert m["fixes"] == {"mixed_down": 2, "resampled": 2, "clipped": 1}   # the counts, as before
    fixed = {f["id"]: f for f in m["fixed"]}
    assert sorted(fixed) == ["both", "loud", "phone8k", "stereo"]           # every repaired file, by name
    assert fixed["stereo"]["fixes"] == ["mixed_down"] and fixed["stereo"]["source"].startswith("2 channels, 16000 Hz")
    assert fixed["phone8k"]["fixes"] == ["resampled"] and fixed["phone8k"]["source"].startswith("1 channel, 8000 Hz")
    assert fixed["both"]["fixes"] == ["mixed_down", "resampled"] and fixed["loud"]["fixes"] == ["clipped"]
    assert fixed["stereo"]["path"].endswith("stereo.wav") and fixed["phone8k"]["path"].endswith("phone8k.wav")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["fixed"] == m["fixed"] and on_disk["fixes"] == m["fixes"]
    # A re-run keeps every shard and gives the same list (it is in each shard's footer).
    log = []
    assert prepare(readers.folder(src), Store(str(out)), shard_size=2, log=log.append)["fixed"] == m["fixed"]
    assert all(line.startswith("kept") for line in log), log


def test_cli_fails_loudly_when_every_file_fails(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.wav").write_bytes(b"junk")
    (src / "b.flac").write_bytes(b"")
    assert vgim_main(["data", "prepare", str(src), "--format", "folder", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "every file failed (2 skipped" in err and not (tmp_path / "o" / "manifest.json").exists()
    assert vgim_main(["data", "prepare", str(tmp_path / "nowhere"), "--format", "folder",
                     "--out", str(tmp_path / "o")]) == 2


def _rows(uri):
    return [(t.id, t.speaker, t.labels, t.audio.tobytes()) for split in ("train", "test")
            for t in iter_utterances(uri, split, cache_dir=uri + "-cache")]


def test_interrupted_prepare_resumes_without_loss_or_duplicates(librispeech_dir, tmp_path, monkeypatch):
    corpus = readers.librispeech(librispeech_dir)
    out = tmp_path / "out"
    calls = {"n": 0}
    real = prepare_mod.load_pcm16

    def interrupted_after_8(path):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(prepare_mod, "load_pcm16", interrupted_after_8)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, Store(str(out)), shard_size=2, log=_quiet)
    monkeypatch.setattr(prepare_mod, "load_pcm16", real)
    # test (6 utterances) goes first: then test shards 0-2 and train shard 0 are complete, train shard 1 not.
    done = sorted(p.name for p in out.glob("*.parquet"))
    assert done == ["test-00000.parquet", "test-00001.parquet", "test-00002.parquet", "train-00000.parquet"]
    assert not (out / "manifest.json").exists()
    # A crash mid-write on a store without atomic rename leaves a truncated shard: it must be rebuilt.
    torn = out / "train-00000.parquet"
    torn.write_bytes(torn.read_bytes()[:100])
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}

    log = []
    m = prepare(corpus, Store(str(out)), shard_size=2, log=log.append)
    assert sum(line.startswith("kept") for line in log) == 3
    for name, t in stamps.items():  # finished shards untouched, the torn one rewritten
        assert ((out / name).stat().st_mtime_ns == t) == (name != torn.name), name
    pq.read_metadata(torn)
    ids = [r[0] for r in _rows(str(out))]
    assert len(ids) == len(set(ids)) == 18 and set(ids) == {it.id for it in corpus.items}
    assert m["utterances"] == 18

    clean = tmp_path / "clean"
    prepare(corpus, Store(str(clean)), shard_size=2, log=_quiet)
    assert _rows(str(out)) == _rows(str(clean))
    assert json.loads((out / "manifest.json").read_text()) == json.loads((clean / "manifest.json").read_text())

    log.clear()  # a finished run re-run does no work
    prepare(corpus, Store(str(out)), shard_size=2, log=log.append)
    assert log and all(line.startswith("kept") for line in log)


def test_prepare_with_no_files(tmp_path):
    with pytest.raises(PrepareError, match="no audio files"):
        prepare(readers.folder(tmp_path), Store(str(tmp_path / "o")), log=_quiet)


def test_odd_files_are_recorded_and_never_stop_the_corpus(librispeech_dir, tmp_path):
    """A file name that is not UTF-8, a symlink loop, a dangling link and a WAV whose header promises more
    samples than it holds: the good files become shards, the name is kept escaped, the rest are skipped."""
    src = tmp_path / "src"
    src.mkdir()
    x, _ = sf.read(sorted(librispeech_dir.rglob("*.flac"))[0], dtype="int16")
    sf.write(src / "good.wav", x, 16000, subtype="PCM_16")
    latin1 = os.fsdecode(bytes(src) + b"/caf\xe9.wav")      # an ISO-8859-1 name: not valid UTF-8
    shutil.copy(src / "good.wav", latin1)
    os.symlink("loop-b.wav", src / "loop-a.wav")
    os.symlink("loop-a.wav", src / "loop-b.wav")
    os.symlink("gone.wav", src / "dangling.wav")
    whole = (src / "good.wav").read_bytes()
    (src / "cut.wav").write_bytes(whole[:len(whole) // 2])  # header still says the full length
    m = prepare(readers.folder(src), Store(str(tmp_path / "out")), log=_quiet)
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    cut = reasons.pop("cut")
    assert cut.startswith(f"truncated: header promises {len(x)} samples, file holds ")
    assert int(cut.rsplit(" ", 1)[1]) in range(len(x) // 2 - 100, len(x) // 2)
    assert reasons == {"loop-a": "symlink loop", "loop-b": "symlink loop", "dangling": "dangling symlink to gone.wav"}
    kept = {u.id: u for u in iter_utterances(str(tmp_path / "out"), "train", cache_dir=str(tmp_path / "c"))}
    assert sorted(kept) == ["caf\\xe9", "good"]
    assert np.array_equal(kept["caf\\xe9"].audio, kept["good"].audio)
    json.dumps(m).encode()  # the manifest is valid UTF-8 JSON


def _flip(path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _audio_offset(path) -> int:
    """A byte inside the Parquet data pages (between the leading magic and the footer)."""
    data = path.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little")
    return (len(data) - 8 - footer) * 3 // 4


def test_random_bit_flips_in_a_shard_stop_the_read_naming_shard_and_row(librispeech_dir, tmp_path):
    clean = tmp_path / "clean"
    prepare(readers.librispeech(librispeech_dir), Store(str(clean)), shard_size=64, log=_quiet)
    name = "train-00000.parquet"
    size = (clean / name).stat().st_size
    rng = np.random.default_rng(0)
    messages = []
    for trial in range(40):
        out = tmp_path / f"flip-{trial}"
        shutil.copytree(clean, out)
        _flip(out / name, int(rng.integers(4, size - 4)), int(rng.integers(8)))  # anywhere but the magic
        with pytest.raises(CorruptShard) as e:
            list(iter_utterances(str(out), "train", cache_dir=str(tmp_path / f"cache-{trial}")))
        messages.append(str(e.value))
        assert str(e.value).startswith(f"shard {out}/{name}: ") and "\n" not in str(e.value)
    assert sum(" row " in m or " rows " in m for m in messages) >= 36, messages
    # Once verified, a shard is read from the cache without reading it again.
    cache = tmp_path / "cache-clean"
    n = len(list(iter_utterances(str(clean), "train", cache_dir=str(cache))))
    (clean / name).write_bytes(b"gone")
    assert len(list(iter_utterances(str(clean), "train", cache_dir=str(cache)))) == n


def test_damaged_shard_is_rebuilt_by_a_prepare_rerun_and_found_by_verify(librispeech_dir, tmp_path, capsys):
    corpus = readers.librispeech(librispeech_dir)
    out = tmp_path / "out"
    prepare(corpus, Store(str(out)), shard_size=4, log=_quiet)
    assert vgim_main(["data", "verify", str(out)]) == 0
    assert "5 shards verified" in capsys.readouterr().out
    damaged = out / "train-00001.parquet"
    _flip(damaged, _audio_offset(damaged), 5)
    assert vgim_main(["data", "verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"shard {out}/train-00001.parquet: row"), err
    log = []
    m = prepare(corpus, Store(str(out)), shard_size=4, log=log.append)
    rebuilt = [line for line in log if not line.startswith("kept")]
    assert len(rebuilt) == 1, log
    # The same damage, the same verdict: prepare names it as verify did (a row, or the rows of an undecodable
    # page).
    assert rebuilt[0].startswith("rebuilt train-00001.parquet: 4 utterances, 0 skipped (the existing one is damaged: "
                                 f"{err[0]})"), (log, err)
    clean = tmp_path / "clean"
    assert m == prepare(corpus, Store(str(clean)), shard_size=4, log=_quiet)
    assert _rows(str(out)) == _rows(str(clean))
    assert vgim_main(["data", "verify", str(out)]) == 0


def _damaged_copies(librispeech_dir, tmp_path) -> list[Path]:
    """Stores whose train-00001.parquet has one bit flipped: in the first rows' data pages (the offset that
    once gave two verdicts), in the last rows', and at the middle of the file."""
    clean = tmp_path / "clean"
    prepare(readers.librispeech(librispeech_dir), Store(str(clean)), shard_size=4, log=_quiet)
    shard = clean / "train-00001.parquet"
    size, end = shard.stat().st_size, _audio_offset(shard) * 4 // 3
    stores = []
    for k, (offset, bit) in enumerate([(_audio_offset(shard), 5), (end // 8, 2), (size // 2, 6)]):
        d = tmp_path / f"damaged{k}"
        shutil.copytree(clean, d)
        _flip(d / "train-00001.parquet", offset, bit)
        stores.append(d)
    return stores


@pytest.mark.slow
def test_verify_of_a_damaged_shard_never_aborts_and_gives_one_verdict(librispeech_dir, tmp_path):
    # Each store verified by the CLI in fresh processes: exit 1 every time, the same line every time.
    for store in _damaged_copies(librispeech_dir, tmp_path):
        verdicts = set()
        for _ in range(4):
            r = subprocess.run([sys.executable, "-m", "vgim_dist", "data", "verify", str(store)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 1, (store, r.returncode, r.stderr[-500:])
            verdicts.add(r.stderr.strip())
        assert len(verdicts) == 1, verdicts
        assert verdicts.pop().startswith(f"shard {store}/train-00001.parquet: ")


def test_locating_damage_decodes_on_one_thread(librispeech_dir, tmp_path):
    # A reader pool thread still decoding when the process exits aborts it ("terminate called without an
    # active exception", exit 134): locating the damaged row must start none.
    store = _damaged_copies(librispeech_dir, tmp_path)[0]
    code = (
        "import os, sys\n"
        "from vgim_dist.data.shard import CorruptShard, decode\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "for _ in range(3):\n"
        "    try:\n"
        "        decode('x', data, None)\n"
        "    except CorruptShard as e:\n"
        "        print(e)\n"
        "print('threads started', len(os.listdir('/proc/self/task')) - before)\n")
    r = subprocess.run([sys.executable, "-c", code, str(store / "train-00001.parquet")], capture_output=True,
                       text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[-1] == "threads started 0", r.stdout + r.stderr
    assert len(set(lines[:-1])) == 1 and lines[0].startswith("shard x: row"), lines


def _descendants_running(pid: int, title: str) -> list[int]:
    import psutil

    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_parallel_prepare_survives_a_worker_killed_mid_shard(tmp_path):
    # Long 44.1 kHz stereo clips: each shard (one file) takes a second or more to decode and resample.
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(src / f"clip{i}.wav", rng.standard_normal((44100 * 40, 2)).astype("float32") * 0.1, 44100,
                 subtype="PCM_16")
    (src / "broken.wav").write_bytes(b"RIFF junk")
    corpus = readers.folder(src)
    corpus.info["source"] = str(src)    # as the command line records it
    serial = prepare(corpus, Store(str(tmp_path / "serial")), shard_size=1, log=_quiet)

    out = tmp_path / "parallel"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "vgim"), "data", "prepare", str(src), "--format",
                             "folder", "--out", str(out), "--shard-size", "1", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (busy := _descendants_running(proc.pid, "ray::prepare_shard")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(busy[0], signal.SIGKILL)     # a Ray worker in the middle of building a shard
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert re.search(r"^prepare: 5/5 shard \(\d+:\d\d elapsed, ETA 0:00\) - ", stderr, re.M)  # per shard, all workers
    assert json.loads((out / "manifest.json").read_text()) == serial
    train = [(t.id, t.audio.tobytes()) for t in iter_utterances(str(out), "train", cache_dir=str(tmp_path / "c"))]
    assert len(train) == 4 and train == [(t.id, t.audio.tobytes()) for t in iter_utterances(
        str(tmp_path / "serial"), "train", cache_dir=str(tmp_path / "c2"))]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "serial").iterdir())
