"""Data section of the experiment config (``data.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    uri: str = field(default="noise://", metadata={"doc": "shard directory (path or s3://), or 'noise://' for "
                                                          "seeded random audio (tests, benchmarks)"})
    crop: int = field(default=20480, metadata={"lo": 1, "doc": "samples per training window (16 kHz)"})
    batch_size: int = field(default=64, metadata={"lo": 1})
    grid: int = field(default=160, metadata={"lo": 1, "doc": "crop offsets are multiples of this"})
    short: Literal["skip", "pad"] = field(default="skip", metadata={
        "doc": "utterances shorter than a crop: left out, or zero-padded at the end"})
    split: str = field(default="train", metadata={"doc": "shard split used for training"})
    prefetch: int = field(default=2, metadata={"lo": 0, "doc": "batches built ahead in a background thread"})
    endpoint_url: str = field(default="", metadata={
        "doc": "S3-compatible endpoint for s3:// URIs; empty = AWS_ENDPOINT_URL or AWS itself"})
    cache_dir: str = field(default="", metadata={
        "doc": "where shards are unpacked for memory-mapping; empty = $VGIM_CACHE or ~/.cache/vgim_dist"})
