"""Corpus -> int16 Parquet shards + ``manifest.json`` on a local path or s3://.

Each split's utterances, in id order, are cut into fixed chunks of ``shard_size`` source files; chunk i
becomes ``<split>-<i>.parquet``, written atomically with its own skip list and a fingerprint of its inputs
in the Parquet footer. A re-run keeps every shard whose fingerprint matches and rebuilds the rest, so an
interrupted run resumes with no utterance lost or duplicated. ``manifest.json`` is written last.

Shards are independent, so they can be built in parallel: with ``workers`` (or a Ray cluster's ``address``)
each shard to build is a Ray task that decodes its files and writes the shard straight to the store. A task
whose worker dies is run again by Ray; the manifest is assembled in shard order from the shards' own
records, so it is the same whichever way, and in whatever order, the shards were built.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from vgim_dist.data.audio import SAMPLE_RATE, BadAudio, load_pcm16
from vgim_dist.data.readers import Corpus, Item
from vgim_dist.data.store import Store

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


@dataclass(frozen=True)
class ShardJob:
    """One shard: its name, its source files in id order and their fingerprint."""

    split: str
    name: str
    chunk: list[Item]
    fingerprint: str


def plan_shards(corpus: Corpus, shard_size: int, min_samples: int) -> list[ShardJob]:
    """Every shard of ``corpus``, split by split (sorted), utterances in id order."""
    splits: dict[str, list[Item]] = {}
    for it in sorted(corpus.items, key=lambda it: it.id):
        splits.setdefault(it.split, []).append(it)
    return [ShardJob(split, f"{split}-{i // shard_size:05d}.parquet", items[i:i + shard_size],
                     _fingerprint(items[i:i + shard_size], min_samples))
            for split, items in sorted(splits.items()) for i in range(0, len(items), shard_size)]


def build_shard(job: ShardJob, store: Store, min_samples: int) -> dict:
    """Decode the job's files, write its shard to ``store`` (atomically) and return the shard's record."""
    record = {"fingerprint": job.fingerprint}
    store.write_bytes(job.name, _build(job.chunk, min_samples, record))
    return record


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
            log: Callable[[str], None] = print, workers: int = 0, address: str = "") -> dict:
    """Write (or finish writing) the shards for ``corpus`` and return the manifest. ``workers`` > 0 builds
    shards as Ray tasks on a private Ray of that many CPUs on this machine; ``address`` on that Ray cluster
    (every node must read the corpus at the same path)."""
    if not corpus.items and not corpus.skipped:
        raise PrepareError(f"no audio files found in {corpus.info.get('source', 'the corpus')}")
    store.check(create=True)
    jobs = plan_shards(corpus, shard_size, min_samples)
    records: dict[str, dict] = {}
    for job in jobs:
        record = _existing(store, job.name)
        if record is not None and record.get("fingerprint") == job.fingerprint:
            records[job.name] = record
            log(f"kept {job.name} (already complete)")
    todo = [job for job in jobs if job.name not in records]
    built = _build_on_ray(todo, store, min_samples, workers, address) if workers or address else (
        (job, build_shard(job, store, min_samples)) for job in todo)
    t0, utterances = time.perf_counter(), 0
    for done, (job, record) in enumerate(built, 1):
        records[job.name] = record
        utterances += record["utterances"] + len(record["skipped"])
        log(f"wrote {job.name}: {record['utterances']} utterances, {len(record['skipped'])} skipped "
            f"[{done}/{len(todo)} shards, {utterances / (time.perf_counter() - t0):.0f} files/s]")
    store.remove_partial()   # half-written files of workers that died mid-write

    manifest = {"format_version": FORMAT_VERSION, "sample_rate": SAMPLE_RATE, "dtype": "int16",
                "corpus": corpus.info, "splits": {}, "skipped": list(corpus.skipped), "fixes": Counter()}
    for split in sorted({job.split for job in jobs}):
        shards, speakers = [], set()
        for job in (j for j in jobs if j.split == split):
            record = records[job.name]
            manifest["skipped"] += record["skipped"]
            manifest["fixes"].update(record["fixes"])
            speakers.update(record["speakers"])
            shards.append({"name": job.name, "utterances": record["utterances"], "samples": record["samples"],
                           "fingerprint": job.fingerprint})
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


def _build_on_ray(jobs: list[ShardJob], store: Store, min_samples: int, workers: int,
                  address: str) -> Iterator[tuple[ShardJob, dict]]:
    """(job, record) of every job, in the order they finish, each built by a Ray task (one CPU each)."""
    import ray  # noqa: PLC0415 - only for parallel preparation

    from vgim_dist import ray_session  # noqa: PLC0415

    owns = ray_session.connect(address, num_cpus=workers or None)
    try:
        # A task whose worker dies is retried (a shard is only ever written whole, so a retry is safe).
        task = ray.remote(num_cpus=1, max_retries=3)(build_shard)
        pending = {task.remote(job, store, min_samples): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            yield job, ray.get(ready[0])
    finally:
        if owns:
            ray.shutdown()
