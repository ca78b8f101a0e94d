"""``vgim data verify``: every shard a manifest lists checked against its checksum, and this machine's
unpacked copies of them (`vgim_dist.data.cache`) against theirs."""

from __future__ import annotations

import json
from collections.abc import Callable

from vgim_dist.data.cache import SIDECAR, cache_dir_for, cached_name, damage
from vgim_dist.data.shard import MANIFEST, CorruptShard, decode
from vgim_dist.data.store import Store
from vgim_dist.storage import checksum


class NoManifest(FileNotFoundError):
    """The store holds no manifest: nothing was prepared there."""


def verify(store: Store, log: Callable[[str], None] = print, cache_dir: str = "") -> tuple[int, list[str]]:
    """Check every shard ``manifest.json`` lists against its checksum: (shards checked, one line per damaged or
    missing shard, naming the row where it can). A damaged cache copy of a shard is named too, and removed:
    the next read unpacks it again."""
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise NoManifest(f"no {MANIFEST} in {store}") from None
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    cache = cache_dir_for(store, cache_dir)
    bad = []
    for shard in shards:
        name = f"{store.uri}/{shard['name']}"
        copy = cache / cached_name(shard)
        if copy.exists() and (problem := damage(copy)) is not None:
            bad.append(f"shard cache {copy}: {problem} (removed; unpacked again from {name} on the next read)")
            copy.unlink(missing_ok=True)
            copy.with_name(copy.name + SIDECAR).unlink(missing_ok=True)
        try:
            data = store.read_bytes(shard["name"])
        except FileNotFoundError:
            bad.append(f"shard {name}: missing")
            continue
        if shard.get("xxh3_64") is None or checksum(data) != shard["xxh3_64"]:
            try:
                decode(name, data, shard.get("xxh3_64"))
            except CorruptShard as e:
                bad.append(str(e))
                continue
        log(f"ok {shard['name']}")
    return len(shards), bad
