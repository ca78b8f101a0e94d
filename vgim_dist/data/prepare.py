"""Corpus -> int16 Parquet shards + ``manifest.json`` on a local path or s3://.

Each split's utterances, in id order, are cut into fixed chunks of ``shard_size`` source files; chunk i
becomes ``<split>-<i>.parquet``, written atomically with its own skip list and a fingerprint of its inputs
in the Parquet footer. A re-run keeps every shard whose fingerprint matches and rebuilds the rest, so an
interrupted run resumes with no utterance lost or duplicated. ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from vgim_dist.data.audio import SAMPLE_RATE, BadAudio, load_pcm16
from vgim_dist.data.readers import Corpus, Item
from vgim_dist.data.store import Store
from vgim_dist.progress import progress

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("id", pa.string()), ("speaker", pa.string()), ("labels", pa.string()),
                    ("length", pa.int64()), ("audio", pa.large_binary())])  # audio: int16 little-endian


class PrepareError(RuntimeError):
    """Nothing usable came out of the corpus."""


def _fingerprint(chunk: list[Item], min_samples: int) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION} min_samples={min_samples}".encode())
    for it in chunk:  # a rewritten source file changes its size or mtime, so its shard is rebuilt
        st = it.path.stat()
        h.update(f"\n{it.id}\t{it.path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _existing(store: Store, name: str) -> dict | None:
    """The footer record of a finished shard, or None when absent or unreadable (rebuilt then)."""
    if not store.exists(name):
        return None
    try:
        with store.open(name) as f:
            meta = pq.read_metadata(f).metadata or {}
        return json.loads(meta[b"vgim"])
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply rebuilt
        return None


def _build(chunk: list[Item], min_samples: int, record: dict) -> bytes:
    rows: dict[str, list] = {f: [] for f in SCHEMA.names}
    skipped, fixes = [], Counter()
    for it in chunk:
        try:
            pcm, repairs = load_pcm16(it.path)
            if len(pcm) < min_samples:
                raise BadAudio(f"too short: {len(pcm)} samples < {min_samples}")
        except BadAudio as e:
            skipped.append({"id": it.id, "path": str(it.path), "reason": str(e)})
            continue
        fixes.update(repairs)
        for f, v in zip(SCHEMA.names, (it.id, it.speaker, json.dumps(it.labels, sort_keys=True), len(pcm),
                                       pcm.astype("<i2").tobytes())):
            rows[f].append(v)
    record.update(utterances=len(rows["id"]), samples=int(sum(rows["length"])), skipped=skipped,
                  fixes=dict(fixes), speakers=sorted(set(rows["speaker"])))
    table = pa.table(rows, schema=SCHEMA).replace_schema_metadata({"vgim": json.dumps(record)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=max(1, len(chunk)))
    return buf.getvalue()


def prepare(corpus: Corpus, store: Store, shard_size: int = 256, min_samples: int = 1,
            log: Callable[[str], None] = print) -> dict:
    """Write (or finish writing) the shards for ``corpus`` and return the manifest."""
    if not corpus.items and not corpus.skipped:
        raise PrepareError(f"no audio files found in {corpus.info.get('source', 'the corpus')}")
    store.check(create=True)
    splits: dict[str, list[Item]] = {}
    for it in sorted(corpus.items, key=lambda it: it.id):
        splits.setdefault(it.split, []).append(it)

    manifest = {"format_version": FORMAT_VERSION, "sample_rate": SAMPLE_RATE, "dtype": "int16",
                "corpus": corpus.info, "splits": {}, "skipped": list(corpus.skipped), "fixes": Counter()}
    for split, items in sorted(splits.items()):
        shards, speakers = [], set()
        for i in progress(range(0, len(items), shard_size), f"{split} shards", unit="shard"):
            chunk, name = items[i:i + shard_size], f"{split}-{i // shard_size:05d}.parquet"
            fp = _fingerprint(chunk, min_samples)
            record = _existing(store, name)
            if record is None or record.get("fingerprint") != fp:
                record = {"fingerprint": fp}
                data = _build(chunk, min_samples, record)
                store.write_bytes(name, data)
                log(f"wrote {name}: {record['utterances']} utterances, {len(record['skipped'])} skipped")
            else:
                log(f"kept {name} (already complete)")
            manifest["skipped"] += record["skipped"]
            manifest["fixes"].update(record["fixes"])
            speakers.update(record["speakers"])
            shards.append({"name": name, "utterances": record["utterances"], "samples": record["samples"],
                           "fingerprint": fp})
        n, samples = sum(s["utterances"] for s in shards), sum(s["samples"] for s in shards)
        manifest["splits"][split] = {"utterances": n, "samples": samples, "seconds": samples / SAMPLE_RATE,
                                     "speakers": len(speakers), "shards": shards}
    manifest["fixes"] = dict(manifest["fixes"])
    manifest["utterances"] = sum(s["utterances"] for s in manifest["splits"].values())
    manifest["seconds"] = sum(s["seconds"] for s in manifest["splits"].values())
    if manifest["utterances"] == 0:
        reasons = Counter(s["reason"].split(":")[0] for s in manifest["skipped"]).most_common(3)
        raise PrepareError(f"every file failed ({len(manifest['skipped'])} skipped; most common: {reasons}); "
                           f"no manifest written to {store}")
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
