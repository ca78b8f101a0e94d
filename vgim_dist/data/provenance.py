"""Which word recording a syllable clip was cut from, established from the audio, not from file names.

The published de Boer corpus names every syllable file take ``_1``, and its test syllables were cut from
take-2 word recordings, so a split that trusts the take number in a name puts test syllables beside their
own word recordings in training. A syllable's samples appear inside its word recording, so the normalised
cross-correlation of the clip against that recording peaks near 1, and well below it against any other take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from vgim_dist.data.audio import BadAudio

RATE = 8000  # matching rate
MATCH = 0.9  # a clip cut from a recording correlates at 0.98-1.0 with it (resampling, 16-bit rounding)
MARGIN = 0.03  # the best recording must beat the runner-up by this much (true matches score 0.99+)


@dataclass(frozen=True)
class Match:
    recording: str | None  # None: provenance unknown
    score: float  # best normalised cross-correlation
    runner_up: float
    reason: str = ""


# Band-limited to 1 kHz: a clip cut at a sample of another rate sits up to half an 8 kHz sample off the
# grid, which would cost a broadband match up to a third of its correlation; below 1 kHz it costs < 3 %.
_LOWPASS = signal.butter(6, 1000, fs=RATE, output="sos")


def _load(path: Path, unpad: bool = False) -> np.ndarray:
    """Mono at 8 kHz, band-limited; ``unpad`` first drops the exact zeros a padded clip has at either end."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise BadAudio(f"unreadable: {e}") from e
    x = x.mean(axis=1)
    if unpad:
        sound = np.flatnonzero(x)
        x = x[sound[0]:sound[-1] + 1] if len(sound) else x[:0]
    if len(x) == 0:
        return x
    g = math.gcd(sr, RATE)
    return signal.sosfiltfilt(_LOWPASS, signal.resample_poly(x, RATE // g, sr // g)).astype(np.float32)


def ncc_peak(haystack: np.ndarray, needle: np.ndarray) -> float:
    """Max over offsets of the normalised cross-correlation of ``needle`` with windows of ``haystack``."""
    n, m = len(haystack), len(needle)
    if m == 0 or n < m:
        return 0.0
    corr = signal.correlate(haystack, needle, mode="valid", method="fft")            # (n - m + 1,)
    energy = np.concatenate([[0.0], np.cumsum(haystack.astype(np.float64) ** 2)])
    window = np.sqrt(np.maximum(energy[m:] - energy[:-m], 1e-12))           # (n - m + 1,)
    return float((corr / (window * np.linalg.norm(needle) + 1e-12)).max())


class Provenance:
    """Matches syllable clips against word recordings; word audio is decoded once and kept."""

    def __init__(self, recordings: dict[str, Path]):
        self.recordings = recordings  # recording name (``<word>_<take>``) -> word file
        self._audio: dict[str, np.ndarray | None] = {}

    def _word(self, name: str) -> np.ndarray | None:
        if name not in self._audio:
            try:
                self._audio[name] = _load(self.recordings[name])
            except BadAudio:
                self._audio[name] = None
        return self._audio[name]

    def match(self, clip: Path, word: str) -> Match:
        """The recording of ``word`` (any take) that ``clip`` was cut from."""
        try:
            x = _load(clip, unpad=True)
        except BadAudio as e:
            return Match(None, 0.0, 0.0, f"unreadable syllable: {e}")
        if len(x) == 0:
            return Match(None, 0.0, 0.0, "silent syllable")
        candidates = sorted(r for r in self.recordings if r.split("_")[0] == word)
        scores = sorted(((ncc_peak(w, x), r) for r in candidates if (w := self._word(r)) is not None), reverse=True)
        if not scores:
            return Match(None, 0.0, 0.0, f"no word recording of {word!r}")
        best, name = scores[0]
        second = scores[1][0] if len(scores) > 1 else 0.0
        if best < MATCH:
            return Match(None, best, second, f"no recording of {word!r} contains it (best correlation {best:.2f} "
                                             f"with {name}, needs {MATCH})")
        if best - second < MARGIN:
            return Match(None, best, second, f"ambiguous: {name} {best:.3f} vs {scores[1][1]} {second:.3f}")
        return Match(name, best, second)
