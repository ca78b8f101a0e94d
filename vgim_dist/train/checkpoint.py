"""Coordinated checkpoints: every module of every stage saved for the same step, on disk or S3.

Layout under ``<run.dir>/checkpoints/step-<N>/``:
  module-<i>.safetensors        weights and buffers, keys ``module.<i>.<name>``
  module-<i>.train.safetensors  optimizer moments (``module.<i>.optim.<param>.<key>``) and RNG state
                                (``module.<i>.rng``); JSON metadata (step, param groups) in the header
  module-<i>.zero-<r>.safetensors  DeepSpeed ZeRO 1/2 only: replica r's partition of the master weights and
                                Adam moments (resumable with the same replica count)
  module-<i>.safetensors        also for a module the run does not train (loaded from another run, frozen)
  checkpoint.json               written last, once every module is saved: marks the checkpoint complete and
                                records each file's size and xxh3-64 checksum, and its own checksum
                                (``marker_xxh3_64``, over its other fields), so a damaged marker is noticed
Beside them, ``<run.dir>/run.json`` is the run's identity: a random id written when the run starts, and the
newest step it committed. Every commit first checks that it is still there with the same id, and a resume
checks that the step it names is still committed: a store that lost what the run committed (emptied,
recreated, pointed elsewhere) stops the run with one line naming what vanished, instead of a silent fresh
start.

Nothing is unpickled on load, and nothing is loaded that does not match its checksum: a resume takes the newest
committed step whose files are intact, with a warning naming each damaged file it passes over. Replicas of a
stage hold identical weights, so replica 0 writes them.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

import torch
from safetensors.torch import load as st_load, save as st_save

from vgim_dist.parallel.deepspeed_engine import load_zero_partition_state, zero_partition_state
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import StorageFault, checksum, open_dir, read_bytes, retrying, shown, write_bytes
from vgim_dist.train.stage import Stage

_STEP_DIR = re.compile(r"step-(\d+)$")
log = logging.getLogger(__name__)
MARKER = "checkpoint.json"
MARKER_SUM = "marker_xxh3_64"   # a marker's (and run.json's) checksum of its other fields
IDENTITY = "run.json"


class CorruptCheckpoint(StorageFault):
    """A committed checkpoint file does not match the size or checksum its marker records; names the file."""


class LostRun(StorageFault):
    """The run directory no longer holds what the run committed; names what vanished."""


class CheckpointManager:
    def __init__(self, run_dir: str | RunDir, keep: int = 0, endpoint_url: str = ""):
        self.fs, root = (run_dir.fs, run_dir.root) if isinstance(run_dir, RunDir) else open_dir(run_dir, endpoint_url)
        self.root = f"{root}/checkpoints"
        self.identity = f"{root}/{IDENTITY}"
        self.keep = keep
        self._run_id: str | None = None   # as first read by this process
        self.frozen: dict[str, bytes] = {}

    def freeze(self, files: dict[str, bytes]) -> None:
        """Weight files of modules this run does not train (another run's, loaded and frozen: train/lower.py),
        by name: written into every checkpoint this manager commits, and recorded in its marker."""
        self.frozen = files

    def claim(self, resume: bool) -> None:
        """At the run's start: a new run writes its identity; a resume checks that the newest step the run
        committed is still there, and keeps the identity."""
        if resume and self._has_identity():   # a run from before identities were kept has none
            try:
                record = self._identity()
            except CorruptCheckpoint as e:
                log.warning("%s; the run's identity is written anew", e)
                return self.claim(resume=False)
            committed = record.get("committed")
            if committed is not None and committed not in self.steps():
                raise LostRun(f"{shown(self.fs, self.step_dir(committed))}: checkpoint step {committed}, "
                              f"committed by this run, vanished from the store (newest left: {self.latest()}); "
                              "restore the store, or start a new run in another run.dir")
            self._run_id = record["run_id"]
            return
        self._run_id = uuid.uuid4().hex
        self._write_identity(self.latest())

    def _has_identity(self) -> bool:
        return retrying("reach", shown(self.fs, self.identity), self.fs.exists, self.identity)

    def _identity(self) -> dict:
        where = shown(self.fs, self.identity)
        try:
            raw = read_bytes(self.fs, self.identity)
        except FileNotFoundError:
            raise LostRun(f"{where}: the run's identity vanished, and with it what the run had committed "
                          "(the store was emptied or replaced); stopping instead of starting over: restore the "
                          "store, or start a new run in another run.dir") from None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:
            raise CorruptCheckpoint(f"{where}: unreadable, {len(raw)} bytes ({_one_line(e)})") from None
        body = {k: v for k, v in record.items() if k != MARKER_SUM}
        if record.get(MARKER_SUM) != _marker_sum(body) or not isinstance(body.get("run_id"), str):
            raise CorruptCheckpoint(f"{where}: does not match its checksum")
        return body

    def _write_identity(self, committed: int | None) -> None:
        body = {"run_id": self._run_id, "committed": committed}
        write_bytes(self.fs, self.identity, json.dumps({**body, MARKER_SUM: _marker_sum(body)}).encode())

    def _check_identity(self) -> None:
        """Before a commit: the identity this process first saw is still there. A manager that saw none yet
        (a worker's first commit) takes the one on storage, or, where nothing was ever committed, starts one."""
        if self._run_id is None and not self._has_identity() and not self.steps():
            self._run_id = uuid.uuid4().hex
            return
        run_id = self._identity()["run_id"]
        if self._run_id is None:
            self._run_id = run_id
        elif run_id != self._run_id:
            raise LostRun(f"{shown(self.fs, self.identity)}: another run's identity ({run_id}, not {self._run_id}); "
                          "the store was replaced during the run: stopping instead of mixing two runs")

    def step_dir(self, step: int) -> str:
        return f"{self.root}/step-{step}"

    def save_stage(self, stage: Stage, step: int) -> dict[str, dict]:
        """Write the stage's modules for ``step`` (the stage must have taken exactly ``step`` steps); the
        size and checksum of each file written, by name, for ``commit``."""
        assert stage.step == step, f"stage {stage.index} is at step {stage.step}, asked to save step {step}"
        rank = stage.replicas.rank if stage.replicas else 0
        files = {}
        for pos, i in enumerate(stage.module_ids):
            if rank == 0:
                weights, train, meta = stage.module_state(pos)
                files[f"module-{i}.safetensors"] = st_save(weights)
                files[f"module-{i}.train.safetensors"] = st_save(train, metadata={"meta": json.dumps(meta)})
            if stage.zero_partitioned:
                files[f"module-{i}.zero-{rank}.safetensors"] = st_save(zero_partition_state(stage.engines[pos]))
        for name, data in files.items():
            write_bytes(self.fs, f"{self.step_dir(step)}/{name}", data)
        return {name: {"bytes": len(data), "xxh3_64": checksum(data)} for name, data in files.items()}

    def commit(self, step: int, modules: list[int], files: dict[str, dict], info: dict | None = None,
               partitions: dict[int, int] | None = None) -> None:
        """Mark ``step`` complete once every module (and, for ZeRO, every replica's partition of module i,
        ``partitions[i]`` of them) is on storage at the size ``files`` (every stage's ``save_stage``) records;
        prune old checkpoints."""
        d = self.step_dir(step)
        for name, data in self.frozen.items():
            write_bytes(self.fs, f"{d}/{name}", data)
        files = {**files, **{n: {"bytes": len(data), "xxh3_64": checksum(data)} for n, data in self.frozen.items()}}
        names = [*self.frozen, *(f"module-{i}{kind}.safetensors" for i in modules for kind in ("", ".train"))]
        names += [f"module-{i}.zero-{r}.safetensors" for i, n in (partitions or {}).items() for r in range(n)]
        listing = retrying("list", shown(self.fs, d), self.fs.ls, d, True)
        stored = {p["name"].rsplit("/", 1)[1]: p["size"] for p in listing}
        bad = [n for n in names if n not in files or stored.get(n) != files[n]["bytes"]]
        if bad:
            self._check_identity()   # a store that lost the run says so first (files vanish as a bucket is emptied)
            raise StorageFault(f"{shown(self.fs, d)}: checkpoint step {step} incomplete, {bad} missing or short "
                               "(the store lost files this run wrote, or a stage did not write them)")
        self._check_identity()
        body = {"step": step, "modules": modules, **(info or {}), "files": {n: files[n] for n in names}}
        write_bytes(self.fs, f"{d}/{MARKER}", json.dumps({**body, MARKER_SUM: _marker_sum(body)}, indent=1).encode())
        self._write_identity(step)
        if self.keep:
            for old in self.steps()[: -self.keep]:
                retrying("delete", shown(self.fs, self.step_dir(old)), self.fs.rm, self.step_dir(old), True)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        return retrying("list", shown(self.fs, self.root), self._steps)

    def _steps(self) -> list[int]:
        # Other processes (the stages, on other nodes) write here: never answer from a cached S3 listing.
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        found = []
        for p in self.fs.ls(self.root, detail=False):
            m = _STEP_DIR.search(p.rstrip("/"))
            if m and self.fs.exists(f"{p.rstrip('/')}/{MARKER}"):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def newest_intact(self) -> int | None:
        """The newest committed step whose every file matches its marker, passing over damaged ones with a
        warning that names the file; None when nothing is committed. Raises CorruptCheckpoint when every
        committed step is damaged: a run never starts over silently from older state or from scratch."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                for name in self._marker(step).get("files", {}):
                    self.read(step, name)
                return step
            except CorruptCheckpoint as e:
                older = [s for s in steps if s < step]
                if not older:
                    raise
                log.warning("%s; falling back to checkpoint step %d", e, older[-1])
        return None

    def _marker(self, step: int) -> dict:
        """The commit marker of ``step``, verified: CorruptCheckpoint naming it when it is truncated, emptied,
        not JSON, or does not match its own checksum."""
        path = f"{self.step_dir(step)}/{MARKER}"
        where = shown(self.fs, path)
        raw = read_bytes(self.fs, path)
        try:
            marker = json.loads(raw)
            if not isinstance(marker, dict):
                raise ValueError(f"a JSON {type(marker).__name__}, not an object")
        except ValueError as e:   # JSONDecodeError and UnicodeDecodeError both are
            raise CorruptCheckpoint(f"{where}: commit marker unreadable, {len(raw)} bytes ({_one_line(e)})") from None
        if MARKER_SUM not in marker:   # committed before markers carried their own checksum
            return marker
        body = {k: v for k, v in marker.items() if k != MARKER_SUM}
        if marker[MARKER_SUM] != _marker_sum(body) or body.get("step") != step or "files" not in body:
            raise CorruptCheckpoint(f"{where}: commit marker does not match its checksum")
        return body

    def files(self, step: int) -> dict[str, dict]:
        """The files committed for ``step``, each with its size and xxh3-64 checksum, as its verified marker
        records them (what a run's outputs name as their provenance)."""
        return self._marker(step).get("files", {})

    def read(self, step: int, name: str) -> bytes:
        """A file of committed step ``step``, verified against the size and checksum its marker records."""
        path = f"{self.step_dir(step)}/{name}"
        want = self._marker(step).get("files")
        where = shown(self.fs, path)
        if want is None:  # committed before checkpoints carried checksums
            log.warning("%s: checkpoint step %d records no checksums; loaded unverified", where, step)
            return read_bytes(self.fs, path)
        if name not in want:
            raise CorruptCheckpoint(f"{where}: not recorded in its {MARKER}")
        try:
            data = read_bytes(self.fs, path)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where}: missing from a committed checkpoint") from None
        if len(data) != want[name]["bytes"]:
            raise CorruptCheckpoint(f"{where}: {len(data)} bytes, committed with {want[name]['bytes']} (truncated?)")
        if checksum(data) != want[name]["xxh3_64"]:
            raise CorruptCheckpoint(f"{where}: checksum mismatch (xxh3-64 {checksum(data)}, committed with "
                                    f"{want[name]['xxh3_64']})")
        return data

    def load_weights(self, step: int, module: int) -> dict[str, torch.Tensor]:
        return st_load(self.read(step, f"module-{module}.safetensors"))

    def load_stage(self, stage: Stage, step: int) -> None:
        for pos, i in enumerate(stage.module_ids):
            raw = self.read(step, f"module-{i}.train.safetensors")
            meta = json.loads(_header_metadata(raw)["meta"])
            stage.load_module_state(pos, self.load_weights(step, i), st_load(raw), meta)
            if stage.zero_partitioned:
                rank = stage.replicas.rank if stage.replicas else 0
                part = st_load(self.read(step, f"module-{i}.zero-{rank}.safetensors"))
                load_zero_partition_state(stage.engines[pos], part)


def _marker_sum(body: dict) -> str:
    return checksum(json.dumps(body, sort_keys=True).encode())


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _header_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__", {})
