"""Coordinated checkpoints: every module of every stage saved for the same step, on disk or S3.

Layout under ``<run.dir>/checkpoints/step-<N>/``:
  module-<i>.safetensors        weights and buffers, keys ``module.<i>.<name>``
  module-<i>.train.safetensors  optimizer moments (``module.<i>.optim.<param>.<key>``) and RNG state
                                (``module.<i>.rng``); JSON metadata (step, param groups) in the header
  module-<i>.zero-<r>.safetensors  DeepSpeed ZeRO 1/2 only: replica r's partition of the master weights and
                                Adam moments (resumable with the same replica count)
  checkpoint.json               written last, once every module is saved: marks the checkpoint complete
Nothing is unpickled on load. Replicas of a stage hold identical weights, so replica 0 writes them.
"""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vgim_dist.parallel.deepspeed_engine import (
    load_zero_partition_state,
    zero_partition_state,
)
from vgim_dist.storage import open_dir, write_bytes
from vgim_dist.train.stage import Stage

_STEP_DIR = re.compile(r"step-(\d+)$")


class CheckpointManager:
    def __init__(self, run_dir: str, keep: int = 0, endpoint_url: str = ""):
        self.fs, root = open_dir(run_dir, endpoint_url)
        self.root = f"{root}/checkpoints"
        self.keep = keep

    def step_dir(self, step: int) -> str:
        return f"{self.root}/step-{step}"

    def save_stage(self, stage: Stage, step: int) -> None:
        """Write the stage's modules for ``step`` (the stage must have taken exactly ``step`` steps)."""
        assert stage.step == step, f"stage {stage.index} is at step {stage.step}, asked to save step {step}"
        d = self.step_dir(step)
        rank = stage.replicas.rank if stage.replicas else 0
        for pos, i in enumerate(stage.module_ids):
            if rank == 0:
                weights, train, meta = stage.module_state(pos)
                write_bytes(self.fs, f"{d}/module-{i}.safetensors", st_save(weights))
                write_bytes(self.fs, f"{d}/module-{i}.train.safetensors",
                            st_save(train, metadata={"meta": json.dumps(meta)}))
            if stage.zero_partitioned:
                write_bytes(self.fs, f"{d}/module-{i}.zero-{rank}.safetensors",
                            st_save(zero_partition_state(stage.engines[pos])))

    def commit(self, step: int, modules: list[int], info: dict | None = None,
               partitions: dict[int, int] | None = None) -> None:
        """Mark ``step`` complete once every module (and, for ZeRO, every replica's partition of module i,
        ``partitions[i]`` of them) is on storage; prune old checkpoints."""
        d = self.step_dir(step)
        files = [f"{d}/module-{i}.train.safetensors" for i in modules]
        files += [f"{d}/module-{i}.zero-{r}.safetensors" for i, n in (partitions or {}).items() for r in range(n)]
        missing = [f.rsplit("/", 1)[1] for f in files if not self.fs.exists(f)]
        if missing:
            raise RuntimeError(f"checkpoint step {step} incomplete: {missing} missing under {d}")
        write_bytes(self.fs, f"{d}/checkpoint.json",
                    json.dumps({"step": step, "modules": modules, **(info or {})}, indent=1).encode())
        if self.keep:
            for old in self.steps()[: -self.keep]:
                self.fs.rm(self.step_dir(old), recursive=True)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for p in self.fs.ls(self.root, detail=False):
            m = _STEP_DIR.search(p.rstrip("/"))
            if m and self.fs.exists(f"{p.rstrip('/')}/checkpoint.json"):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def load_weights(self, step: int, module: int) -> dict[str, torch.Tensor]:
        return st_load(self.fs.cat_file(f"{self.step_dir(step)}/module-{module}.safetensors"))

    def load_stage(self, stage: Stage, step: int) -> None:
        d = self.step_dir(step)
        for pos, i in enumerate(stage.module_ids):
            raw = self.fs.cat_file(f"{d}/module-{i}.train.safetensors")
            meta = json.loads(_header_metadata(raw)["meta"])
            stage.load_module_state(pos, self.load_weights(step, i), st_load(raw), meta)
            if stage.zero_partitioned:
                rank = stage.replicas.rank if stage.replicas else 0
                part = st_load(self.fs.cat_file(f"{d}/module-{i}.zero-{rank}.safetensors"))
                load_zero_partition_state(stage.engines[pos], part)


def _header_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__", {})
