"""Corpus -> int16 Parquet shards + ``manifest.json`` on a local path or s3://.

Each split's utterances, in id order, are cut into fixed chunks of ``shard_size`` source files; chunk i
becomes ``<split>-<i>.parquet`` (`prepare_shard`), written atomically with its own skip list and a fingerprint
of its inputs in the Parquet footer. A re-run keeps every shard whose fingerprint matches and whose rows all
match their checksums, and rebuilds the rest, so an interrupted run resumes with no utterance lost,
duplicated or damaged. ``manifest.json`` is written last, with each shard's size and file checksum.

Shards are independent, so they can be made in parallel: with ``workers`` (or a Ray cluster's ``address``)
each shard is a Ray task that checks or builds it and writes it straight to the store. A task whose worker
dies is run again by Ray; the manifest is assembled in shard order from the shards' own records, so it is
the same whichever way, and in whatever order, the shards were made.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vgim_dist.data.audio import SAMPLE_RATE, BadAudio, load_pcm16, source_format
from vgim_dist.data.readers import Corpus, Item, utf8_name
from vgim_dist.data.shard import FORMAT_VERSION, MANIFEST, SCHEMA, CorruptShard, decode, encode, footer_record
from vgim_dist.data.store import Store
from vgim_dist.progress import progress
from vgim_dist.storage import checksum


class PrepareError(RuntimeError):
    """Nothing usable came out of the corpus."""


def _fingerprint(chunk: list[Item], min_samples: int) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION} min_samples={min_samples}".encode())
    for it in chunk:  # a rewritten source file changes its size or mtime, so its shard is rebuilt
        st = it.path.stat()
        h.update(f"\n{it.id}\t".encode() + os.fsencode(it.path) + f"\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _build(chunk: list[Item], min_samples: int, record: dict) -> bytes:
    rows: dict[str, list] = {f: [] for f in SCHEMA.names[:-1]}
    skipped, fixed, fixes = [], [], Counter()
    for it in chunk:
        try:
            pcm, repairs = load_pcm16(it.path)
            if len(pcm) < min_samples:
                raise BadAudio(f"too short: {len(pcm)} samples < {min_samples}")
        except BadAudio as e:
            skipped.append({"id": it.id, "path": utf8_name(it.path), "reason": str(e)})
            continue
        fixes.update(repairs)
        if repairs:
            fixed.append({"id": it.id, "path": utf8_name(it.path), "fixes": repairs, "source": source_format(it.path)})
        for f, v in zip(SCHEMA.names[:-1], (it.id, it.speaker, json.dumps(it.labels, sort_keys=True), len(pcm),
                                       pcm.astype("<i2").tobytes())):
            rows[f].append(v)
    record.update(utterances=len(rows["id"]), samples=int(sum(rows["length"])), skipped=skipped,
                  fixes=dict(fixes), fixed=fixed, speakers=sorted(set(rows["speaker"])))
    return encode(rows, record)


def prepare_shard(store: Store, name: str, chunk: list[Item], min_samples: int) -> tuple[dict, dict, str]:
    """Make shard ``name`` of ``chunk``: (its footer record, its manifest entry, a line saying what was done).
    An existing shard is kept when it was made from the same inputs and every row matches its checksum."""
    fp = _fingerprint(chunk, min_samples)
    # A shard made before repaired files were named ("fixed") counts them only: made again to name them.
    record, data, done = kept_or_built(store, name, fp, lambda record: _build(chunk, min_samples, record),
                                       usable=lambda record: "fixed" in record or not record.get("fixes"))
    entry = {"name": name, "utterances": record["utterances"], "samples": record["samples"], "fingerprint": fp,
             "bytes": len(data), "xxh3_64": checksum(data)}
    return record, entry, done


def kept_or_built(store: Store, name: str, fingerprint: str, build: Callable[[dict], bytes],
                  usable: Callable[[dict], bool] = lambda record: True) -> tuple[dict, bytes, str]:
    """(footer record, bytes, a line saying what was done) of shard ``name``: the one in ``store`` when its
    footer records ``fingerprint`` (and is ``usable``) and every row matches its checksum, else
    ``build(record)`` (which fills in ``utterances`` and ``skipped``) written atomically in its place."""
    data = store.read_bytes(name) if store.exists(name) else None
    record = footer_record(data) if data is not None else None
    damage = ""
    if record is not None and record.get("fingerprint") == fingerprint and usable(record):
        try:
            decode(f"{store.uri}/{name}", data, want=None)
            return record, data, f"kept {name} (already complete, every row verified)"
        except CorruptShard as e:
            damage = f" (the existing one is damaged: {e})"
    record = {"fingerprint": fingerprint}
    data = build(record)
    store.write_bytes(name, data)
    return record, data, (f"{'rebuilt' if damage else 'wrote'} {name}: {record['utterances']} utterances, "
                          f"{len(record['skipped'])} skipped{damage}")


def duplicate_ids(items: list[Item]) -> list[dict]:
    """Ids given to more than one file, within or across splits: ``{"id", "splits", "paths"}`` each."""
    by_id: dict[str, list[Item]] = {}
    for it in items:
        by_id.setdefault(it.id, []).append(it)
    return [{"id": k, "splits": sorted({it.split for it in v}), "paths": [str(it.path) for it in v]}
            for k, v in sorted(by_id.items()) if len(v) > 1]


@dataclass(frozen=True)
class ShardJob:
    """One shard to make: its split, its name and its source files, in id order."""

    split: str
    name: str
    chunk: list[Item]

    @property
    def units(self) -> int:
        return len(self.chunk)


def plan_shards(corpus: Corpus, shard_size: int) -> list[ShardJob]:
    """Every shard of ``corpus``, split by split (sorted), utterances in id order."""
    splits: dict[str, list[Item]] = {}
    for it in sorted(corpus.items, key=lambda it: it.id):
        splits.setdefault(it.split, []).append(it)
    return [ShardJob(split, f"{split}-{i // shard_size:05d}.parquet", items[i:i + shard_size])
            for split, items in sorted(splits.items()) for i in range(0, len(items), shard_size)]


def prepare(corpus: Corpus, store: Store, shard_size: int = 256, min_samples: int = 1,
            log: Callable[[str], None] | None = None, workers: int = 0, address: str = "") -> dict:
    """Write (or finish writing) the shards for ``corpus`` and return the manifest. ``workers`` > 0 makes the
    shards as Ray tasks on a private Ray of that many CPUs on this machine; ``address`` on that Ray cluster
    (every node must read the corpus at the same path). ``log`` gets a line per shard and the warnings; without
    it, progress is a bar on a terminal (a line per shard in a log file) and warnings go to stderr."""
    if not corpus.items and not corpus.skipped:
        raise PrepareError(f"no audio files found in {corpus.info.get('source', 'the corpus')}")
    store.check(create=True)
    jobs = plan_shards(corpus, shard_size)
    results = make_shards(jobs, functools.partial(_prepare_job, store, min_samples), store, "prepare", "files",
                          log, workers, address)
    say = log or (lambda line: print(line, file=sys.stderr))

    manifest = {"format_version": FORMAT_VERSION, "sample_rate": SAMPLE_RATE, "dtype": "int16",
                "corpus": corpus.info, "splits": {}, "skipped": list(corpus.skipped), "fixes": Counter(),
                "fixed": [], "duplicate_ids": duplicate_ids(corpus.items)}
    if dups := manifest["duplicate_ids"]:
        say(f"warning: {len(dups)} ids occur more than once (e.g. {dups[0]['id']} in {dups[0]['splits']}); "
            "results on these shards cannot tell the clips apart, see duplicate_ids in the manifest")
    for split in sorted({job.split for job in jobs}):
        shards, speakers = [], set()
        for job in (j for j in jobs if j.split == split):
            record, entry = results[job.name]
            manifest["skipped"] += record["skipped"]
            manifest["fixes"].update(record["fixes"])
            manifest["fixed"] += record.get("fixed", [])
            speakers.update(record["speakers"])
            shards.append(entry)
        n, samples = sum(s["utterances"] for s in shards), sum(s["samples"] for s in shards)
        manifest["splits"][split] = {"utterances": n, "samples": samples, "audio_seconds": samples / SAMPLE_RATE,
                                     "speakers": len(speakers), "shards": shards}
    manifest["fixes"] = dict(manifest["fixes"])
    manifest["utterances"] = sum(s["utterances"] for s in manifest["splits"].values())
    manifest["audio_seconds"] = sum(s["audio_seconds"] for s in manifest["splits"].values())
    if manifest["utterances"] == 0:
        reasons = Counter(s["reason"].split(":")[0] for s in manifest["skipped"]).most_common(3)
        raise PrepareError(f"every file failed ({len(manifest['skipped'])} skipped; most common: {reasons}); "
                           f"no manifest written to {store}")
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _prepare_job(store: Store, min_samples: int, job: ShardJob) -> tuple[dict, dict, str]:
    return prepare_shard(store, job.name, job.chunk, min_samples)


def make_shards(jobs: list, make: Callable, store: Store, what: str, unit: str,
                log: Callable[[str], None] | None = None, workers: int = 0,
                address: str = "") -> dict[str, tuple[dict, dict]]:
    """(footer record, manifest entry) of every job's shard, by name: ``make(job)`` (a picklable callable
    returning what `prepare_shard` returns) for each job with a ``name`` and a count of ``unit``, ``units``, in this
    process, or as Ray tasks with ``workers`` (a private Ray of that many CPUs) or ``address`` (a cluster).
    ``log`` gets a line per shard; without it, progress is a bar on a terminal (a line per shard in a log
    file). What workers that died mid-write left behind is removed at the end."""
    made = _on_ray(jobs, make, f"{what}_shard", workers, address) if workers or address else (
        (job, make(job)) for job in jobs)
    if log is None:
        made = progress(made, what, total=len(jobs), unit="shard", note=lambda made: made[1][2])
    results: dict[str, tuple[dict, dict]] = {}
    t0, units = time.perf_counter(), 0
    for n, (job, (record, entry, done)) in enumerate(made, 1):   # in the order they finish
        results[job.name] = record, entry
        units += job.units
        if log is not None:
            log(f"{done} [{n}/{len(jobs)} shards, {units / (time.perf_counter() - t0):.0f} {unit}/s]")
    store.remove_partial()
    return results


def _run(make: Callable, job):
    return make(job)


def _on_ray(jobs: list, make: Callable, name: str, workers: int,
            address: str) -> Iterator[tuple[object, tuple[dict, dict, str]]]:
    """(job, ``make(job)``) for every job, in the order they finish, each a Ray task of one CPU named ``name``
    (its worker's process title is ``ray::<name>``)."""
    import ray  # noqa: PLC0415 - only for parallel preparation

    from vgim_dist import ray_session  # noqa: PLC0415

    owns = ray_session.connect(address, num_cpus=workers or None)
    try:
        # A task whose worker dies is run again: a shard is only ever written whole, so that is safe.
        task = ray.remote(num_cpus=1, max_retries=3)(_run).options(name=name)
        pending = {task.remote(make, job): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(ready[0]), ray.get(ready[0])
    finally:
        if owns:
            ray.shutdown()
