"""Coordinated checkpoints: every module of every stage saved for the same step, on disk or S3.

Layout under ``<run.dir>/checkpoints/step-<N>/``:
  module-<i>.safetensors        weights and buffers, keys ``module.<i>.<name>``
  module-<i>.train.safetensors  optimizer moments (``module.<i>.optim.<param>.<key>``) and RNG state
                                (``module.<i>.rng``); JSON metadata (step, param groups) in the header
  module-<i>.zero-<r>.safetensors  DeepSpeed ZeRO 1/2 only: replica r's partition of the master weights and
                                Adam moments (resumable with the same replica count)
  checkpoint.json               written last, once every module is saved: marks the checkpoint complete and
                                records each file's size and xxh3-64 checksum
Nothing is unpickled on load, and nothing is loaded that does not match its checksum: a resume takes the newest
committed step whose files are intact, with a warning naming each damaged file it passes over. Replicas of a
stage hold identical weights, so replica 0 writes them.
"""

from __future__ import annotations

import json
import logging
import re

import torch
from safetensors.torch import load as st_load, save as st_save

from vgim_dist.parallel.deepspeed_engine import load_zero_partition_state, zero_partition_state
from vgim_dist.storage import StorageFault, checksum, open_dir, read_bytes, retrying, shown, write_bytes
from vgim_dist.train.stage import Stage

_STEP_DIR = re.compile(r"step-(\d+)$")
log = logging.getLogger(__name__)
MARKER = "checkpoint.json"


class CorruptCheckpoint(StorageFault):
    """A committed checkpoint file does not match the size or checksum its marker records; names the file."""


class CheckpointManager:
    def __init__(self, run_dir: str, keep: int = 0, endpoint_url: str = ""):
        self.fs, root = open_dir(run_dir, endpoint_url)
        self.root = f"{root}/checkpoints"
        self.keep = keep

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
        names = [f"module-{i}{kind}.safetensors" for i in modules for kind in ("", ".train")]
        names += [f"module-{i}.zero-{r}.safetensors" for i, n in (partitions or {}).items() for r in range(n)]
        listing = retrying("list", shown(self.fs, d), self.fs.ls, d, True)
        stored = {p["name"].rsplit("/", 1)[1]: p["size"] for p in listing}
        bad = [n for n in names if n not in files or stored.get(n) != files[n]["bytes"]]
        if bad:
            raise RuntimeError(f"checkpoint step {step} incomplete: {bad} missing or short under {d}")
        write_bytes(self.fs, f"{d}/{MARKER}", json.dumps(
            {"step": step, "modules": modules, **(info or {}), "files": {n: files[n] for n in names}},
            indent=1).encode())
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
        return json.loads(read_bytes(self.fs, f"{self.step_dir(step)}/{MARKER}"))

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


def _header_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__", {})
