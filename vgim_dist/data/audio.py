"""Decoding one audio file into the pinned shard format: mono int16 PCM at 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16000
SCALE = 32768.0  # int16 <-> float32 in [-1, 1]; the same convention soundfile uses for 16-bit PCM


class BadAudio(Exception):
    """A file that cannot become a clip; ``str(e)`` is the reason recorded in the manifest."""


def to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * SCALE), -SCALE, SCALE - 1).astype(np.int16)


def load_pcm16(path: Path) -> tuple[np.ndarray, list[str]]:
    """Mono 16 kHz int16 samples and the repairs made on the way (mixed down, resampled, clipped)."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt files
        raise BadAudio(f"unreadable: {e}") from e
    if x.shape[0] == 0:
        raise BadAudio("empty: no samples")
    if not np.isfinite(x).all():
        raise BadAudio("non-finite samples (NaN or inf)")
    fixes = []
    if x.shape[1] > 1:
        fixes.append("mixed_down")
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        fixes.append("resampled")
        x = AF.resample(torch.from_numpy(x), sr, SAMPLE_RATE).numpy()
        if x.shape[0] == 0:
            raise BadAudio(f"empty after resampling from {sr} Hz")
    if np.abs(x).max() > 1.0:
        fixes.append("clipped")
    return to_pcm16(x), fixes
