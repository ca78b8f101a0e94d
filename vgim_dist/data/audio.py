"""Decoding one audio file into the pinned shard format: mono int16 PCM at 16 kHz."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
SCALE = 32768.0  # int16 <-> float32 in [-1, 1]; the same convention soundfile uses for 16-bit PCM


class BadAudio(Exception):
    """A file that cannot become a clip; ``str(e)`` is the reason recorded in the manifest."""


def to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * SCALE), -SCALE, SCALE - 1).astype(np.int16)


@functools.cache
def _resampler(sr: int) -> torchaudio.transforms.Resample:
    """The same filter as ``torchaudio.functional.resample``, its kernel built once per source rate."""
    return torchaudio.transforms.Resample(sr, SAMPLE_RATE, dtype=torch.float32)


def load_pcm16(path: Path) -> tuple[np.ndarray, list[str]]:
    """Mono 16 kHz int16 samples and the repairs made on the way (mixed down, resampled, clipped)."""
    try:
        # bytes: a file name that is not valid UTF-8 opens too
        x, sr = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt files
        raise BadAudio(f"unreadable: {e}") from e
    if x.shape[0] == 0:
        raise BadAudio("empty: no samples")
    promised = wav_header_frames(path)
    if promised is not None and promised > x.shape[0]:  # libsndfile quietly reads what is there
        raise BadAudio(f"truncated: header promises {promised} samples, file holds {x.shape[0]}")
    if not np.isfinite(x).all():
        raise BadAudio("non-finite samples (NaN or inf)")
    fixes = []
    if x.shape[1] > 1:
        fixes.append("mixed_down")
    x = x.mean(axis=1)
    if sr != SAMPLE_RATE:
        fixes.append("resampled")
        x = _resampler(sr)(torch.from_numpy(x)).numpy()
        if x.shape[0] == 0:
            raise BadAudio(f"empty after resampling from {sr} Hz")
    if np.abs(x).max() > 1.0:
        fixes.append("clipped")
    return to_pcm16(x), fixes


def source_format(path: Path) -> str:
    """What a repaired file was before, for the manifest: e.g. ``2 channels, 8000 Hz, PCM_16``."""
    try:
        info = sf.info(os.fsencode(path))
    except Exception:  # noqa: BLE001 - it was read a moment ago; a detail is not worth failing for
        return ""
    return f"{info.channels} channel{'s' * (info.channels != 1)}, {info.samplerate} Hz, {info.subtype}"


def wav_header_frames(path: Path) -> int | None:
    """Frames a RIFF/WAVE header's ``data`` chunk declares; None for other files or streamed (unsized) data."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        block_align = 0
        while len(head := f.read(8)) == 8:
            kind, size = head[:4], struct.unpack("<I", head[4:])[0]
            if kind == b"fmt " and size >= 16:
                block_align = struct.unpack("<H", f.read(16)[12:14])[0]
                f.seek(size - 16 + (size & 1), os.SEEK_CUR)
            elif kind == b"data":
                return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)
    return None
