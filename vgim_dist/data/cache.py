"""The unpacked shard cache: each shard, once verified, as an uncompressed Arrow IPC file that every training
process memory-maps, under ``$VGIM_CACHE/shards/<store key>/`` (default ``~/.cache/vgim_dist``).

A cache file is named by the checksum of the shard it came from, so a changed shard is never served from an
old copy, and it has a sidecar ``<file>.xxh3`` holding the xxh3-64 of the cache file itself, written before
the file appears. A process verifies a cache file against its sidecar the first time it opens it (about
9 ms for a 30 MB shard); a mismatch (bit rot, a truncated copy, a file written by hand) is discarded with a
warning and unpacked again from the verified shard, so damage in the cache never reaches training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa

from vgim_dist.data.shard import decode
from vgim_dist.data.store import Store
from vgim_dist.storage import checksum

SIDECAR = ".xxh3"
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("VGIM_CACHE", Path.home() / ".cache" / "vgim_dist"))


def cache_dir_for(store: Store, cache_dir: str = "") -> Path:
    """The folder holding ``store``'s unpacked shards (one per store URI and endpoint)."""
    key = hashlib.sha256(f"{store.uri}|{store.endpoint}".encode()).hexdigest()[:16]
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "shards" / key


def cached_name(shard: dict) -> str:
    """The cache file's name for a manifest's shard entry."""
    return f"{shard['name'].removesuffix('.parquet')}-{shard.get('xxh3_64', shard['fingerprint'])[:16]}.arrow"


def damage(path: Path) -> str | None:
    """Why the cache file at ``path`` cannot be trusted, or None when it matches its sidecar."""
    try:
        want = path.with_name(path.name + SIDECAR).read_text().strip()
    except FileNotFoundError:
        return "no recorded checksum"
    with open(path, "rb") as f:
        data = f.read()
    got = checksum(data)
    return None if got == want else f"checksum mismatch (xxh3-64 {got}, written with {want})"


def unpacked(store: Store, shard: dict, cache: Path) -> Path:
    """The shard as a verified uncompressed Arrow IPC file in ``cache``: checked when it is there already,
    else (and after damage) made from the shard, itself verified against the manifest. Safe when several
    processes make the same file at once: each writes its own temporary copy and renames it into place."""
    out = cache / cached_name(shard)
    if out.exists():
        problem = damage(out)
        if problem is None:
            return out
        log.warning("shard cache %s: %s; discarded and unpacked again from %s/%s", out, problem, store.uri,
                    shard["name"])
        out.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        table = decode(f"{store.uri}/{shard['name']}", store.read_bytes(shard["name"]),
                       shard.get("xxh3_64")).combine_chunks()
        part = Path(tmp) / out.name
        with pa.ipc.new_file(str(part), table.schema) as w:
            w.write_table(table)
        sidecar = Path(tmp) / (out.name + SIDECAR)
        sidecar.write_text(checksum(part.read_bytes()))
        os.replace(sidecar, out.with_name(out.name + SIDECAR))   # the checksum first, then the file it covers
        os.replace(part, out)
    return out
