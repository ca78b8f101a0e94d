"""``vgim encode``: a trained run's modules 0..K, frozen, over every utterance of an audio shard set ->
latent shards (docs/latents.md).

A latent shard is an audio shard's counterpart: the same names, splits and utterances, each row a frames x
channels array (`data.shard.LATENT_SCHEMA`) with its own checksum, the file's checksum in ``manifest.json``.
Shards are made, kept on a re-run and run in parallel by the machinery of ``vgim data prepare``
(`data.prepare.make_shards`, `kept_or_built`); a shard's fingerprint names the checkpoint's checksums, so a
re-run against another checkpoint makes it again.

Long utterances run in chunks (`train.encoder.ChunkedEncoder`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import yaml

from vgim_dist.config import dump_config
from vgim_dist.data.audio import SAMPLE_RATE, SCALE
from vgim_dist.data.latents import DTYPES, LATENTS, parts
from vgim_dist.data.loader import read_manifest
from vgim_dist.data.prepare import kept_or_built, make_shards
from vgim_dist.data.shard import FORMAT_VERSION, LATENT_SCHEMA, MANIFEST, SCHEMA, decode, encode as shard_bytes
from vgim_dist.data.store import Store
from vgim_dist.downstream import module_geometry
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import absolute_uri, checksum
from vgim_dist.train.checkpoint import CheckpointManager
from vgim_dist.train.encoder import ChunkedEncoder, load_encoder, run_config

What = Literal["params", "mean"]


class EncodeError(ValueError):
    """A request `vgim encode` cannot carry out; names the argument."""


@dataclass(frozen=True)
class EncodeSpec:
    """What every shard task needs to make its shard (picklable, for Ray tasks)."""

    run: str
    step: int
    module: int
    what: What
    dtype: str
    chunk: int
    endpoint_url: str
    checkpoint: tuple[tuple[str, str], ...]     # (file, xxh3-64) of modules 0..module: the provenance


@functools.lru_cache(maxsize=1)
def _encoder(spec: EncodeSpec) -> ChunkedEncoder:
    """The spec's encoder, loaded once per process (its files verified against their checksums)."""
    run_dir = RunDir(spec.run, spec.endpoint_url)
    cfg = run_config(run_dir)
    encoder = load_encoder(cfg, spec.step, run_dir, upto=spec.module)
    return ChunkedEncoder(cfg, encoder, parts(cfg.model, spec.module, spec.what) == 2, spec.chunk)


@dataclass(frozen=True)
class EncodeJob:
    """One latent shard: its split, its name (the audio shard's) and the audio shard's manifest entry."""

    split: str
    name: str
    source: dict

    @property
    def units(self) -> int:
        return self.source["utterances"]


def encode_shard(spec: EncodeSpec, src: Store, out: Store, job: EncodeJob) -> tuple[dict, dict, str]:
    """Make latent shard ``job.name`` from the audio shard of that name: (its footer record, its manifest
    entry, a line saying what was done). An existing one is kept when made from the same audio shard by the
    same checkpoint and settings, and every row matches its checksum."""
    fp = hashlib.sha256(json.dumps([f"latents v{FORMAT_VERSION}", asdict(spec), job.source["xxh3_64"]],
                                   sort_keys=True).encode()).hexdigest()

    def build(record: dict) -> bytes:
        enc, dtype = _encoder(spec), DTYPES[spec.dtype]
        table = decode(f"{src.uri}/{job.name}", src.read_bytes(job.name), job.source.get("xxh3_64"))
        rows: dict[str, list] = {f: [] for f in LATENT_SCHEMA.names[:-1]}
        skipped = []
        for id_, speaker, labels, length, audio in zip(*(table.column(c).to_pylist() for c in SCHEMA.names[:-1])):
            if enc.frames(length) < 1:
                skipped.append({"id": id_, "reason": f"too short: {length} samples give no frame of module "
                                                     f"{spec.module}"})
                continue
            z = enc(torch.from_numpy(np.frombuffer(audio, "<i2").astype(np.float32) / SCALE)).to(dtype)
            for f, v in zip(LATENT_SCHEMA.names[:-1], (id_, speaker, labels, z.shape[0],
                                                       z.contiguous().view(torch.uint8).numpy().tobytes())):
                rows[f].append(v)
        record.update(utterances=len(rows["id"]), frames=int(sum(rows["frames"])), skipped=skipped)
        return shard_bytes(rows, record, LATENT_SCHEMA)

    record, data, done = kept_or_built(out, job.name, fp, build)
    entry = {"name": job.name, "utterances": record["utterances"], "frames": record["frames"], "fingerprint": fp,
             "bytes": len(data), "xxh3_64": checksum(data)}
    return record, entry, done


def encode(run: str, module: int, data: str, out: str, step: int | None = None, what: What = "params",
           dtype: str = "float32", chunk_seconds: float = 10.0, endpoint_url: str = "", workers: int = 0,
           address: str = "", log=None) -> dict:
    """Write (or finish writing) the latent shards of ``run``'s modules 0..``module`` over the audio shards at
    ``data`` into ``out``; returns the manifest. ``workers``, ``address`` and ``log`` as for
    `data.prepare.prepare`."""
    run = absolute_uri(run)     # the provenance names the run wherever the shards are read
    run_dir = RunDir(run, endpoint_url)
    cfg = run_config(run_dir)
    n = len(cfg.model.modules)
    if not 0 <= module < n:
        raise EncodeError(f"--module {module}: {run} has modules 0..{n - 1}")
    if what not in ("params", "mean"):
        raise EncodeError(f"--what {what!r}: expected params or mean")
    if dtype not in DTYPES:
        raise EncodeError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ckpt = CheckpointManager(run_dir)
    steps = ckpt.steps()
    step = (steps[-1] if steps else None) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{run}: no committed checkpoint" + (f" for step {step}; it has {steps}"
                                                                     if step is not None else ""))
    files = ckpt.files(step)
    weights = tuple((f"module-{i}.safetensors", files[f"module-{i}.safetensors"]["xxh3_64"])
                    for i in range(module + 1))
    src, dst = Store(data, endpoint_url), Store(out, endpoint_url)
    source = read_manifest(src)
    if source.get("kind") == LATENTS:
        raise EncodeError(f"--data {data}: latent shards; give the audio shards they were made from")
    dst.check(create=True)
    spec = EncodeSpec(run, step, module, what, dtype, round(chunk_seconds * SAMPLE_RATE), endpoint_url, weights)
    jobs = [EncodeJob(split, s["name"], s) for split, v in sorted(source["splits"].items()) for s in v["shards"]]
    results = make_shards(jobs, functools.partial(encode_shard, spec, src, dst), dst, "encode", "utterances", log,
                          workers, address)
    geometry = module_geometry(cfg)[module]
    width = parts(cfg.model, module, what)
    manifest = {
        "format_version": FORMAT_VERSION, "kind": LATENTS, "sample_rate": SAMPLE_RATE,
        "provenance": {"run": run, "step": step, "module": module, "checkpoint": dict(weights),
                       "config": yaml.safe_load(dump_config(cfg))},
        "source": {"uri": absolute_uri(data), "manifest_xxh3_64": checksum(src.read_bytes(MANIFEST)),
                   "corpus": source.get("corpus", {})},
        "hop": geometry["hop"], "receptive_field": geometry["receptive_field"], "channels": geometry["channels"],
        "what": "params" if width == 2 else "mean", "parts": ["mean", "logvar"][:width], "dtype": dtype,
        "chunk_samples": spec.chunk, "splits": {}, "skipped": []}
    for split in sorted(source["splits"]):
        shards = [results[j.name][1] for j in jobs if j.split == split]
        manifest["skipped"] += [s for j in jobs if j.split == split for s in results[j.name][0]["skipped"]]
        manifest["splits"][split] = {"utterances": sum(s["utterances"] for s in shards),
                                     "frames": sum(s["frames"] for s in shards), "shards": shards}
    manifest["utterances"] = sum(s["utterances"] for s in manifest["splits"].values())
    dst.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
