"""Synthetic speech corpora from espeak-ng, written in the real corpora's layouts (no downloads).

``deboer``: CV-CV-CV words over {b, d, g} x {a, i, u} in the de Boer layout and naming. Each syllable
is spoken on its own from phoneme input (plain "bi" would be read as "by") and the word is the three
syllables joined by short gaps, so the syllable files are exactly the pieces of their word.
``librispeech``: sentences from the packaged word lists, one espeak-ng voice per speaker, in the
LibriSpeech layout with CPC-style split files; every speaker is in both splits (a speaker-probe task).
"""

from __future__ import annotations

import functools
import io
import itertools
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from vgim_dist.data.readers import DEBOER_SYLLABLES, DEBOER_WORDS, SYLLABLES

ESPEAK_RATE = 22050
WORD_RATE = 44100  # de Boer word recordings
BASE_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan",
               "en-gb-x-gbcwmd")
VARIANTS = ("", "m1", "f1", "m3", "f2", "m5", "f3", "m7", "f4", "m2", "f5", "m4", "m6", "m8")
PHONEME = {"a": "a:", "i": "i:", "u": "u:"}  # espeak-ng English phonemes for the three vowels


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice[+variant]
    pitch: int = 50  # 0-99
    speed: int = 160  # words per minute


def voices(n: int) -> list[Voice]:
    """``n`` distinct voices: base accents x voice variants, then pitch steps once those run out."""
    out, period = [], len(BASE_VOICES) * len(VARIANTS)
    for i in range(n):  # (i mod 8, (9q + r) mod 14) walks all 112 pairs, changing both at every step
        base, variant = BASE_VOICES[i % len(BASE_VOICES)], VARIANTS[(i // len(BASE_VOICES) + i) % len(VARIANTS)]
        out.append(Voice(f"{base}+{variant}" if variant else base, pitch=50 + (8 * (i // period)) % 50))
    return out


def speak(text: str, voice: Voice) -> np.ndarray:
    """float32 audio at 22.05 kHz."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "-v", voice.name, "-p", str(voice.pitch), "-s", str(voice.speed),
                          "--stdout", text], capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    if sr != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {sr} Hz audio, expected {ESPEAK_RATE}")
    return x


def _trim(x: np.ndarray, rel: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > rel * np.abs(x).max())
    return x[loud[0]:loud[-1] + 1]


def _resample(x: np.ndarray, sr: int, to: int) -> np.ndarray:
    return AF.resample(torch.from_numpy(x), sr, to).clamp(-1, 1).numpy()


def _split(keys: list, test_fraction: float, rng: random.Random) -> dict:
    keys = sorted(keys)
    rng.shuffle(keys)
    n_test = round(len(keys) * test_fraction)
    return {k: "test" if i < n_test else "train" for i, k in enumerate(keys)}


def _parallel(fn, jobs: list) -> list:
    with ThreadPoolExecutor(8) as pool:  # espeak-ng runs in subprocesses
        return list(pool.map(fn, jobs))


def synth_deboer(out: Path, words: int = 64, voices_n: int = 1, takes: int = 2, seed: int = 0,
                 test_fraction: float = 0.2, jitter: bool = True) -> dict:
    """Write a de Boer-style corpus under ``out``; returns counts.

    Each word is said ``takes`` times by each voice; with ``jitter`` every take has its own pitch and
    speed. Names: ``<word>_<take>.wav`` (take numbered from 1 across voices) and
    ``<word>_<take>_<position>_<syllable>.wav`` (position 0-2). As in the original, the syllable folders
    are split independently of the word folders.
    """
    rng = random.Random(seed)
    vocabulary = ["".join(w) for w in itertools.product(SYLLABLES, repeat=3)]
    if not 1 <= words <= len(vocabulary):
        raise ValueError(f"--words must be 1..{len(vocabulary)}")
    chosen = sorted(rng.sample(vocabulary, words))
    recordings = []  # (word, take number, voice)
    for v, voice in enumerate(voices(voices_n)):
        for t in range(takes):
            if jitter:
                voice = Voice(voice.name, pitch=min(99, max(0, voice.pitch + rng.randint(-8, 8))),
                              speed=voice.speed + rng.randint(-20, 20))
            recordings += [(w, v * takes + t + 1, voice) for w in chosen]

    def syllables(rec):
        word, _, voice = rec
        return [_trim(speak(f"[[{s[0]}'{PHONEME[s[1]]}]]", voice)) for s in (word[:2], word[2:4], word[4:])]

    pieces = _parallel(syllables, recordings)
    gap = np.zeros(int(0.03 * ESPEAK_RATE), np.float32)
    pad_to = max(len(p) for ps in pieces for p in ps)
    word_split = _split([f"{w}_{t}" for w, t, _ in recordings], test_fraction, rng)
    syl_split = _split([f"{w}_{t}_{i}" for w, t, _ in recordings for i in range(3)], test_fraction, rng)
    for (word, take, _), ps in zip(recordings, pieces):
        name = f"{word}_{take}"
        audio = np.concatenate([ps[0], gap, ps[1], gap, ps[2]])
        path = out / DEBOER_WORDS / word_split[name] / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _resample(audio, ESPEAK_RATE, WORD_RATE), WORD_RATE, subtype="PCM_16")
        for i, p in enumerate(ps):
            syl = word[2 * i:2 * i + 2]
            path = out / DEBOER_SYLLABLES / syl_split[f"{name}_{i}"] / f"{name}_{i}_{syl}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, np.pad(p, (0, pad_to - len(p))), ESPEAK_RATE, subtype="PCM_16")
    return {"words": len(recordings), "syllables": 3 * len(recordings), "voices": voices_n}


@functools.cache
def _wordlist(name: str) -> list[str]:
    return resources.files("vgim_dist.data").joinpath(f"wordlists/{name}.txt").read_text().split()


def sentence(rng: random.Random) -> str:
    adj, noun, verb, adv = (_wordlist(n) for n in ("adjectives", "nouns", "verbs", "adverbs"))
    text = " and ".join(f"the {rng.choice(adj)} {rng.choice(noun)} {rng.choice(verb)} the {rng.choice(noun)}"
                        for _ in range(rng.randint(1, 2)))
    return f"{text} {rng.choice(adv)}" if rng.random() < 0.5 else text


def synth_librispeech(out: Path, speakers: int = 4, utterances: int = 10, seed: int = 0,
                      test_fraction: float = 0.2, subset: str = "train-clean-100") -> dict:
    """Write ``<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` (16 kHz) with ``.trans.txt`` files,
    and ``train_split.txt`` / ``test_split.txt`` under ``out``; returns counts."""
    rng = random.Random(seed)
    jobs = []  # (utterance id, text, voice)
    for i, voice in enumerate(voices(speakers)):
        spk, chapter = str(100 + i), str(1000 + i)
        voice = Voice(voice.name, voice.pitch, speed=voice.speed + rng.randint(-25, 25))
        jobs += [(f"{spk}-{chapter}-{u:04d}", sentence(rng), voice) for u in range(utterances)]
    audio = _parallel(lambda job: speak(job[1], job[2]), jobs)

    split = {}
    by_speaker = itertools.groupby(jobs, key=lambda job: job[0].split("-")[0])
    for _, group in by_speaker:  # per speaker, so every speaker is in both splits
        split.update(_split([uid for uid, _, _ in group], test_fraction, rng))
    transcripts: dict[Path, list[str]] = {}
    for (uid, text, _), x in zip(jobs, audio):
        spk, chapter, _ = uid.split("-")
        folder = out / subset / spk / chapter
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"{uid}.flac", _resample(x, ESPEAK_RATE, 16000), 16000, subtype="PCM_16")
        transcripts.setdefault(folder / f"{spk}-{chapter}.trans.txt", []).append(f"{uid} {text.upper()}")
    for path, lines in transcripts.items():
        path.write_text("\n".join(lines) + "\n")
    for name in ("train", "test"):
        (out / f"{name}_split.txt").write_text("".join(f"{u}\n" for u in sorted(split) if split[u] == name))
    return {"speakers": speakers, "utterances": len(jobs), "test": sum(v == "test" for v in split.values())}
