"""Synthetic speech corpora in the real corpora's layouts, from speech engines installed as system packages.

Speakers come from three engines (espeak-ng with its voice variants and other languages' voices for
accents, flite's built-in voices, Festival with Debian's festvox voices). A speaker is an (engine, voice,
pitch, rate) tuple, fixed for all its recordings. Every recording then gets its own seeded draw of pitch
and rate jitter, amplitude, additive noise (white or babble) at a random SNR, reverberation through a
synthetic room impulse response, a random gain and silence jitter at both ends; ``difficulty`` scales all
of it (0: clean speech, as one engine would say it). See docs/data.md.

``deboer``: CV-CV-CV words over {b, d, g} x {a, i, u} in the de Boer layout. A word is its three
syllables joined by short gaps, degraded as a whole, and its syllable files are cut from the degraded word,
so each syllable is exactly a piece of one word recording (as in the published corpus).
``librispeech``: sentences from the packaged word lists in the LibriSpeech layout with CPC-style split files.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF

from vgim_dist.data.readers import DEBOER_SPEAKERS, DEBOER_SYLLABLES, DEBOER_WORDS, SYLLABLES

RATE = 22050  # working rate (espeak-ng's own); syllable files are written at it
WORD_RATE = 44100  # de Boer word recordings
ENGINES = ("espeak-ng", "flite", "festival")
PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite",
            "festival": "festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"}

# Voices per engine, and how each is fed a syllable. English espeak-ng voices take phoneme input
# (plain "bi" is read as "by"); the other languages read "ba", "bi", "bu" as written, with their own
# vowels and consonants: the same syllables with an accent.
ESPEAK_ENGLISH = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp")
ESPEAK_ACCENTS = ("es", "it", "de", "pt", "pl", "id", "sw", "fi")
ESPEAK_VARIANTS = ("", "m1", "f1", "m3", "f2", "klatt", "m5", "f3", "croak", "m7", "f4", "klatt2", "m2", "f5",
                   "klatt3", "m4", "m6")
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
EN_PHONEMES = {"a": "a:", "i": "i:", "u": "u:"}  # espeak-ng English phonemes for the three vowels
FESTIVAL_PHONES = {"a": "aa", "i": "iy", "u": "uw"}  # Festival's radio phone set (diphone voices)
SPELLING = {"a": "ah", "i": "ee", "u": "oo"}  # English text for engines without phoneme input
# Engine ranges of a speaker's pitch and rate. espeak-ng: pitch 0-99, rate in words per minute; flite:
# mean F0 in Hz, rate as duration stretch in percent; Festival: rate as duration stretch in percent, pitch
# as a resampling factor in percent (its voices have no pitch knob that works for all of them).
PITCH = {"espeak-ng": (25, 75), "flite": (85, 190), "festival": (90, 112)}
SPEED = {"espeak-ng": (130, 190), "flite": (80, 125), "festival": (80, 125)}


@dataclass(frozen=True)
class Speaker:
    """A speaker identity: the same for every recording it makes."""

    engine: str
    voice: str
    pitch: int
    rate: int

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.voice}:p{self.pitch}:r{self.rate}"


def check_engines(engines: tuple[str, ...]) -> None:
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"engine {e!r}: expected some of {list(ENGINES)}")
        if shutil.which(e) is None:
            raise RuntimeError(f"{e} is not installed (Debian/Ubuntu: apt-get install {PACKAGES[e]}; "
                               "scripts/setup.sh installs every engine)")


def _voice_pools(engines: tuple[str, ...]) -> list[list[tuple[str, str]]]:
    pools = []
    if "espeak-ng" in engines:
        pools.append([("espeak-ng", f"{b}+{v}" if v else b) for v in ESPEAK_VARIANTS for b in ESPEAK_ENGLISH])
    if "flite" in engines:
        pools.append([("flite", v) for v in FLITE_VOICES])
    if "espeak-ng" in engines:
        pools.append([("espeak-ng", f"{b}+{v}" if v else b) for v in ESPEAK_VARIANTS for b in ESPEAK_ACCENTS])
    if "festival" in engines:
        pools.append([("festival", v) for v in FESTIVAL_VOICES])
    return pools


def draw_speakers(n: int, engines: tuple[str, ...] = ENGINES, seed: int = 0) -> list[Speaker]:
    """``n`` distinct speakers, taking voices from the engines in turn; each gets a seeded pitch and rate.

    The first speaker is espeak-ng's ``en-us`` at its default pitch and rate (the one-voice corpus)."""
    rng = random.Random(f"speakers-{seed}")
    pools, out, seen = _voice_pools(engines), [], set()
    turns = itertools.cycle(range(len(pools)))
    taken = [0] * len(pools)
    while len(out) < n:
        p = next(turns)
        engine, voice = pools[p][taken[p] % len(pools[p])]
        taken[p] += 1
        if not out and engine == "espeak-ng":
            s = Speaker(engine, voice, 50, 160)
        else:
            s = Speaker(engine, voice, rng.randint(*PITCH[engine]), rng.randint(*SPEED[engine]))
        if s.id not in seen:
            seen.add(s.id)
            out.append(s)
    return out


# --------------------------------------------------------------------------------------------- engines


def _read(wav: bytes | Path) -> np.ndarray:
    x, sr = sf.read(io.BytesIO(wav) if isinstance(wav, bytes) else wav, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    return resample(x, sr, RATE) if sr != RATE else x


def _espeak(text: str, voice: str, pitch: float, rate: float) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-p", str(round(pitch)), "-s", str(round(rate)), "--stdout",
                          text], capture_output=True, check=True).stdout
    return _read(wav)


def _flite(text: str, voice: str, pitch: float, rate: float) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="vgim-flite-") as d:
        out = Path(d) / "x.wav"
        subprocess.run(["flite", "-voice", voice, "--setf", f"int_f0_target_mean={pitch:.0f}", "--setf",
                        f"duration_stretch={rate / 100:.3f}", "-t", text, "-o", str(out)],
                       capture_output=True, check=True)
        return _read(out)


def _festival(jobs: list[tuple[str, float]], voice: str) -> list[np.ndarray]:
    """Festival, one process for many utterances: jobs of (phones or text, duration stretch in percent)."""
    with tempfile.TemporaryDirectory(prefix="vgim-festival-") as d:
        lines = [f"(voice_{voice})"]
        for k, (what, rate) in enumerate(jobs):
            kind = "Phones" if what.startswith("(") else "Text"
            lines += [f"(Parameter.set 'Duration_Stretch {rate / 100:.3f})",
                      f"(set! u (Utterance {kind} {what}))", "(utt.synth u)",
                      f'(utt.save.wave u "{d}/{k}.wav" \'riff)']
        (Path(d) / "run.scm").write_text("\n".join(lines) + "\n")
        r = subprocess.run(["festival", "-b", f"{d}/run.scm"], capture_output=True, text=True)
        if r.returncode != 0 or not (Path(d) / f"{len(jobs) - 1}.wav").is_file():
            raise RuntimeError(f"festival voice {voice} failed: {r.stderr.strip()[-300:]}")
        return [_read(Path(d) / f"{k}.wav") for k in range(len(jobs))]


def syllable_input(engine: str, voice: str, syllable: str) -> str:
    """What an engine is given to say one CV syllable."""
    c, v = syllable
    if engine == "espeak-ng":
        return f"[[{c}'{EN_PHONEMES[v]}]]" if voice.startswith("en") else syllable
    if engine == "festival" and voice.endswith("_diphone"):
        return f"(pau {c} {FESTIVAL_PHONES[v]} pau)"
    return ("gh" if c == "g" and v == "i" else c) + SPELLING[v]  # "ghee", not "gee"


def say(speaker: Speaker, texts: list[str], jitter: list[tuple[float, float]]) -> list[np.ndarray]:
    """Float32 audio at 22.05 kHz of each text by ``speaker``, with relative (pitch, rate) jitter each."""
    e = speaker.engine
    if e == "festival":
        out = _festival([(t, speaker.rate * r) for t, (_, r) in zip(texts, jitter)], speaker.voice)
        return [stretch(x, speaker.pitch * p / 100) for x, (p, _) in zip(out, jitter)]
    fn = _espeak if e == "espeak-ng" else _flite
    # espeak-ng's rate is words per minute (faster = larger), flite's a duration stretch (slower = larger)
    return [fn(t, speaker.voice, speaker.pitch * p, speaker.rate * (r if e == "espeak-ng" else 1 / r))
            for t, (p, r) in zip(texts, jitter)]


# --------------------------------------------------------------------------------------------- effects


@functools.cache
def _resampler(sr: int, to: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(sr, to, dtype=torch.float32)  # the kernel built once per rate pair


def resample(x: np.ndarray, sr: int, to: int) -> np.ndarray:
    return _resampler(sr, to)(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def stretch(x: np.ndarray, factor: float) -> np.ndarray:
    """Played ``factor`` times faster (pitch and rate together). Linear interpolation: for factors near 1 its
    slight treble loss is far below the noise, and any factor costs the same (a sinc resampler's kernel
    grows with the ratio's denominator)."""
    t = np.arange(0, len(x) - 1, factor)
    return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def _trim(x: np.ndarray, rel: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > rel * np.abs(x).max())
    return x[loud[0]:loud[-1] + 1]


@dataclass(frozen=True)
class Variability:
    """How much each recording varies, from ``difficulty`` d (docs/data.md gives the table)."""

    difficulty: float = 1.0

    @property
    def jitter(self) -> float:  # relative pitch and rate jitter per recording: +-10 % at d = 1
        return 0.10 * self.difficulty

    @property
    def snr_db(self) -> tuple[float, float]:  # 10-20 dB at d = 1, 0-10 dB at d = 1.5
        return 30 - 20 * self.difficulty, 40 - 20 * self.difficulty

    @property
    def reverb_p(self) -> float:
        return min(1.0, 0.5 * self.difficulty)

    @property
    def rt60_s(self) -> tuple[float, float]:
        return 0.1, 0.1 + 0.5 * self.difficulty

    @property
    def gain_db(self) -> float:  # +- this, per recording; and half of it per syllable
        return 6 * self.difficulty

    @property
    def silence_s(self) -> float:  # up to this at each end
        return 0.1 * self.difficulty


def room_impulse_response(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """A synthetic RIR: the direct path, then exponentially decaying noise (-60 dB after ``rt60`` s)."""
    t = np.arange(int(rt60 * RATE)) / RATE
    rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 0.3
    rir[: int(0.002 * RATE)] = 0  # early reflections arrive after the direct sound
    rir[0] = 1.0
    return (rir / np.sqrt((rir ** 2).sum())).astype(np.float32)


def degrade(x: np.ndarray, rng: np.random.Generator, var: Variability, babble: list[np.ndarray],
            marks: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """One recording's reverberation, additive noise, gain and silence jitter; ``marks`` (sample positions
    in ``x``) come back shifted to where they are in the result."""
    d = var.difficulty
    marks = list(marks or [])
    if d > 0 and rng.random() < var.reverb_p:
        rir = room_impulse_response(rng, rng.uniform(*var.rt60_s))
        x = AF.fftconvolve(torch.from_numpy(x), torch.from_numpy(rir)).numpy()[: len(x)]
    lead, tail = (int(rng.uniform(0, var.silence_s) * RATE) for _ in range(2))
    x = np.pad(x, (lead, tail))
    marks = [m + lead for m in marks]
    if d > 0:
        if babble and rng.random() < 0.5:  # babble: three other recordings, each at a random offset
            noise = np.zeros_like(x)
            for k in rng.choice(len(babble), size=min(3, len(babble)), replace=False):
                b = np.resize(babble[k], len(x) + len(babble[k]))
                o = rng.integers(0, len(babble[k]))
                noise += b[o:o + len(x)]
        else:
            noise = rng.standard_normal(len(x)).astype(np.float32)
        snr = rng.uniform(*var.snr_db)
        p_sig, p_noise = float((x ** 2).mean()), float((noise ** 2).mean()) or 1.0
        x = x + noise * math.sqrt(p_sig / p_noise / 10 ** (snr / 10))
    x = x / (np.abs(x).max() or 1.0) * 0.5 * 10 ** (rng.uniform(-var.gain_db, var.gain_db) / 20)
    return np.clip(x, -0.999, 0.999).astype(np.float32), marks


def _parallel(fn, jobs: list) -> list:
    with ThreadPoolExecutor(8) as pool:  # the engines run in subprocesses
        return list(pool.map(fn, jobs))


def _split(keys: list, test_fraction: float, rng: random.Random) -> dict:
    keys = sorted(keys)
    rng.shuffle(keys)
    n_test = math.ceil(len(keys) * test_fraction - 1e-9)
    return {k: "test" if i < n_test else "train" for i, k in enumerate(keys)}


# --------------------------------------------------------------------------------------------- de Boer


def _renditions(spk: Speaker, n: int, var: Variability, seed: int) -> dict[str, list[np.ndarray]]:
    """``n`` renditions of each syllable by ``spk``, each with its own pitch and rate jitter."""
    rng = random.Random(f"renditions-{seed}-{spk.id}")
    jobs = [(s, (1 + rng.uniform(-var.jitter, var.jitter), 1 + rng.uniform(-var.jitter, var.jitter)))
            for s in SYLLABLES for _ in range(n)]
    audio = say(spk, [syllable_input(spk.engine, spk.voice, s) for s, _ in jobs], [j for _, j in jobs])
    out: dict[str, list[np.ndarray]] = {}
    for (s, _), x in zip(jobs, audio):
        out.setdefault(s, []).append(_trim(x))
    return out


def synth_deboer(out: Path, words: int = 64, voices_n: int = 4, takes: int = 1, second_takes: int = 0,
                 difficulty: float = 1.0, engines: tuple[str, ...] = ENGINES, seed: int = 0,
                 test_fraction: float = 0.2, published_naming: bool = False) -> dict:
    """Write a de Boer-style corpus under ``out``; returns counts.

    Each of ``words`` distinct words is said ``takes`` times by each of ``voices_n`` speakers, and
    ``second_takes`` of them once more by the first speaker (the published corpus: 729 words + 122 = 851
    recordings, 680 train / 171 test). Names: ``<word>_<take>.wav`` (take numbered from 1 across voices) and
    ``<word>_<take>_<position>_<syllable>.wav``; ``speakers.tsv`` maps each recording to its speaker.

    The syllable folders are split independently of the word folders, as in the original. With
    ``published_naming`` the syllables copy the published corpus's traps instead: every syllable file is
    named take ``_1`` with positions 1-3, and the test syllables are those of the second takes.
    """
    check_engines(engines)
    rng = random.Random(seed)
    var = Variability(difficulty)
    vocabulary = ["".join(w) for w in itertools.product(SYLLABLES, repeat=3)]
    if not 1 <= words <= len(vocabulary):
        raise ValueError(f"--words must be 1..{len(vocabulary)}")
    if not 0 <= second_takes <= words:
        raise ValueError(f"--second-takes must be 0..{words} (the number of words)")
    chosen = sorted(rng.sample(vocabulary, words))
    people = draw_speakers(voices_n, engines, seed)
    recordings = []  # (word, take number, speaker)
    for v, spk in enumerate(people):
        recordings += [(w, v * takes + t + 1, spk) for t in range(takes) for w in chosen]
    recordings += [(w, voices_n * takes + 1, people[0]) for w in sorted(rng.sample(chosen, second_takes))]
    if published_naming and voices_n * takes + (second_takes > 0) > 2:
        raise ValueError("--published-naming names every syllable take _1: at most two recordings per word")

    n_rend = 1 if difficulty == 0 else 3
    renditions = dict(zip(people, _parallel(lambda s: _renditions(s, n_rend, var, seed), people)))
    gap = int(0.03 * RATE)
    clean, marks = [], []
    for word, _, spk in recordings:  # clean words: the three syllables with gaps, amplitude jitter per syllable
        pieces = [rng.choice(renditions[spk][word[i:i + 2]]) for i in (0, 2, 4)]
        pieces = [p * 10 ** (rng.uniform(-var.gain_db, var.gain_db) / 40) for p in pieces]
        pieces = [stretch(p, 1 + rng.uniform(-var.jitter, var.jitter) / 2) for p in pieces]
        gaps = [int(gap * (1 + rng.uniform(-var.difficulty, var.difficulty) / 2)) for _ in range(2)]
        bounds, pos = [], 0
        for i, p in enumerate(pieces):
            bounds += [pos, pos + len(p)]
            pos += len(p) + (gaps[i] if i < 2 else 0)
        audio = np.zeros(pos, np.float32)
        for p, start in zip(pieces, bounds[::2]):
            audio[start:start + len(p)] = p
        clean.append(audio)
        marks.append(bounds)
    nprng = np.random.default_rng(rng.getrandbits(63))
    babble = clean[: min(len(clean), 32)]
    final = [degrade(x, nprng, var, babble, m) for x, m in zip(clean, marks)]

    word_split = _split([f"{w}_{t}" for w, t, _ in recordings], test_fraction, rng)
    syl_split = _split([f"{w}_{t}_{i}" for w, t, _ in recordings for i in range(3)], test_fraction, rng)
    pad_to = max(b[2 * i + 1] - b[2 * i] for _, b in final for i in range(3))
    for folder in (DEBOER_WORDS, DEBOER_SYLLABLES):
        for split in ("train", "test"):
            (out / folder / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for (word, take, spk), (audio, b) in zip(recordings, final):
        name = f"{word}_{take}"
        sf.write(out / DEBOER_WORDS / word_split[name] / f"{name}.wav", resample(audio, RATE, WORD_RATE), WORD_RATE,
                 subtype="PCM_16")
        rows.append(f"{name}\t{spk.id}\n")
        if published_naming and take > 2:
            continue
        for i in range(3):
            syl, piece = word[2 * i:2 * i + 2], audio[b[2 * i]:b[2 * i + 1]]
            if published_naming:
                split, fname = ("train" if take == 1 else "test"), f"{word}_1_{i + 1}_{syl}.wav"
            else:
                split, fname = syl_split[f"{name}_{i}"], f"{name}_{i}_{syl}.wav"
            sf.write(out / DEBOER_SYLLABLES / split / fname, np.pad(piece, (0, pad_to - len(piece))), RATE,
                     subtype="PCM_16")
    (out / DEBOER_SPEAKERS).write_text("".join(sorted(rows)))
    n_test = sum(v == "test" for v in word_split.values())
    return {"words": len(recordings), "train_words": len(recordings) - n_test, "test_words": n_test,
            "syllables": sum(1 for _ in (out / DEBOER_SYLLABLES).rglob("*.wav")), "speakers": len(people),
            "difficulty": difficulty}


# --------------------------------------------------------------------------------------------- LibriSpeech


@functools.cache
def _wordlist(name: str) -> list[str]:
    return resources.files("vgim_dist.data").joinpath(f"wordlists/{name}.txt").read_text().split()


def sentence(rng: random.Random) -> str:
    adj, noun, verb, adv = (_wordlist(n) for n in ("adjectives", "nouns", "verbs", "adverbs"))
    text = " and ".join(f"the {rng.choice(adj)} {rng.choice(noun)} {rng.choice(verb)} the {rng.choice(noun)}"
                        for _ in range(rng.randint(1, 2)))
    return f"{text} {rng.choice(adv)}" if rng.random() < 0.5 else text


def synth_librispeech(out: Path, speakers: int = 4, utterances: int = 10, difficulty: float = 1.0,
                      engines: tuple[str, ...] = ENGINES, seed: int = 0, test_fraction: float = 0.2,
                      disjoint_speakers: bool = False, subset: str = "train-clean-100") -> dict:
    """Write ``<subset>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` (16 kHz) with ``.trans.txt`` files, and
    ``train_split.txt`` / ``test_split.txt`` under ``out``; returns counts. By default every speaker is in
    both splits (a speaker-probe task); ``disjoint_speakers`` puts whole speakers in the test split instead."""
    check_engines(engines)
    rng = random.Random(seed)
    var = Variability(difficulty)
    people = draw_speakers(speakers, engines, seed)
    jobs = []  # (utterance id, text, speaker, jitter)
    for i, spk in enumerate(people):
        spk_id, chapter = str(100 + i), str(1000 + i)
        jobs += [(f"{spk_id}-{chapter}-{u:04d}", sentence(rng), spk,
                  (1 + rng.uniform(-var.jitter, var.jitter), 1 + rng.uniform(-var.jitter, var.jitter)))
                 for u in range(utterances)]
    by_speaker = {spk: [j for j in jobs if j[2] == spk] for spk in people}
    said = _parallel(lambda js: say(js[0][2], [j[1] for j in js], [j[3] for j in js]), list(by_speaker.values()))
    audio = dict(zip((j[0] for js in by_speaker.values() for j in js), itertools.chain.from_iterable(said)))
    nprng = np.random.default_rng(rng.getrandbits(63))
    babble = list(audio.values())[:32]

    split = {}
    if disjoint_speakers:
        spk_split = _split([str(100 + i) for i in range(speakers)], test_fraction, rng)
        split = {uid: spk_split[uid.split("-")[0]] for uid, *_ in jobs}
    else:
        for i in range(speakers):  # per speaker, so every speaker is in both splits
            split.update(_split([uid for uid, *_ in jobs if uid.startswith(f"{100 + i}-")], test_fraction, rng))
    transcripts: dict[Path, list[str]] = {}
    for uid, text, *_ in jobs:
        spk_id, chapter, _ = uid.split("-")
        folder = out / subset / spk_id / chapter
        folder.mkdir(parents=True, exist_ok=True)
        x, _ = degrade(audio[uid], nprng, var, babble)
        sf.write(folder / f"{uid}.flac", resample(x, RATE, 16000), 16000, subtype="PCM_16")
        transcripts.setdefault(folder / f"{spk_id}-{chapter}.trans.txt", []).append(f"{uid} {text.upper()}")
    for path, lines in transcripts.items():
        path.write_text("\n".join(lines) + "\n")
    for name in ("train", "test"):
        (out / f"{name}_split.txt").write_text("".join(f"{u}\n" for u in sorted(split) if split[u] == name))
    (out / "SPEAKERS.tsv").write_text("".join(f"{100 + i}\t{s.id}\n" for i, s in enumerate(people)))
    return {"speakers": speakers, "utterances": len(jobs), "test": sum(v == "test" for v in split.values()),
            "difficulty": difficulty}
