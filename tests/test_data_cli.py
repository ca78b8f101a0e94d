"""`vgim data ...` end to end in a subprocess: synthesise a multi-voice de Boer corpus, prepare syllables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import soundfile as sf

from vgim_dist.data.loader import iter_utterances

pytestmark = pytest.mark.slow  # `make test` runs it, `make test-fast` skips it


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vgim_dist", "data", *args], capture_output=True,
                          text=True, timeout=120)


def test_synth_then_prepare_syllables_with_clean_split(tmp_path):
    src, out = tmp_path / "deboer", tmp_path / "shards"
    r = _cli("synth", "deboer", str(src), "--words", "3", "--voices", "2", "--takes", "1", "--seed", "4")
    assert r.returncode == 0, r.stderr
    words = sorted(p.stem for p in (src / "reshuffledv2").rglob("*.wav"))
    assert len(words) == 6 and {w.split("_")[1] for w in words} == {"1", "2"}  # one take per voice
    r = _cli("prepare", str(src), "--format", "deboer", "--level", "syllable", "--syllable-split", "clean",
             "--out", str(out), "--shard-size", "4")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["corpus"]["split_rule"] == "clean" and m["corpus"]["level"] == "syllable"
    assert m["utterances"] == 18 and m["fixes"] == {"resampled": 18} and not m["skipped"]
    frames = sf.info(next((src / "split up data padded").rglob("*.wav"))).frames
    test = list(iter_utterances(str(out), "test", cache_dir=str(tmp_path / "cache")))
    word_split = {w: p.parent.name for p in (src / "reshuffledv2").rglob("*.wav") for w in [p.stem]}
    assert test and all(word_split["_".join(u.id.split("_")[:2])] == "test" for u in test)
    assert {len(u.audio) for u in test} == {-(-frames * 16000 // 22050)}  # padded: all one length
