"""Per-step metrics: kept as rows, written to ``<run.dir>/metrics.jsonl``, shown as a live console line."""

from __future__ import annotations

import bisect
import json
import logging
import sys
import time

import torch

from vgim_dist.progress import eta
from vgim_dist.run_dir import RunDir
from vgim_dist.storage import is_local, open_dir, read_bytes, shown, write_bytes

log = logging.getLogger(__name__)


class MetricsLog:
    """Rows of ``{"step": N, "<name>": value, ...}``, on storage within seconds of being recorded: appended at
    every logged step on a local disk, rewritten at most every ``REMOTE_FLUSH_S`` on an object store, and
    whole at every checkpoint. On resume (and a pipeline's recovery), rows past the restored checkpoint are
    dropped from memory and from the file, so that no step appears twice."""

    REMOTE_FLUSH_S = 5.0

    def __init__(self, run_dir: str | RunDir, total_steps: int, endpoint_url: str = "", stream=sys.stderr):
        self.fs, root = (run_dir.fs, run_dir.root) if isinstance(run_dir, RunDir) else open_dir(run_dir, endpoint_url)
        self.path = f"{root}/metrics.jsonl"
        self.total = total_steps
        self.stream = stream
        self.rows: list[dict] = []
        self._written: int | None = 0     # rows of ``rows`` already in the file; None: rewrite it whole
        self._flushed_at = time.monotonic()
        self._clock = (time.monotonic(), 0)   # (time, step) the run started at: elapsed and ETA

    def resume(self, step: int) -> None:
        """Keep the rows up to ``step`` from the file. A line that is not a whole row (a crash cut the last one
        short, or the file was damaged) is dropped, with a warning naming the file and the lines unless it is
        only the last line cut short; the file is then rewritten without it at the next flush."""
        self._clock = (time.monotonic(), step)
        try:
            lines = read_bytes(self.fs, self.path).decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return
        rows, damaged = [], []
        for n, line in enumerate(lines, 1):
            row = _row(line)
            if row is None:
                damaged.append(n)
            elif row["step"] <= step:
                rows.append(row)
        if damaged and damaged != [len(lines)]:
            log.warning("%s: %d damaged lines dropped (lines %s); the metric history there is lost",
                        shown(self.fs, self.path), len(damaged), ", ".join(map(str, damaged[:10]))
                        + (", ..." if len(damaged) > 10 else ""))
        self.rows = rows
        self._written = len(rows) if len(rows) == len(lines) else None

    def record(self, step: int, values: dict[str, torch.Tensor | float], prefix: str = "") -> dict:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        now = time.monotonic()
        self.stream.write(prefix + progress_line(row, self.total) + " | " + eta(now, step, self._clock, self.total)
                          + "\n")
        self.stream.flush()
        if is_local(self.fs) or now - self._flushed_at >= self.REMOTE_FLUSH_S:
            self.flush()
        return row

    def add(self, step: int, values: dict[str, float]) -> None:
        """A row that belongs to an earlier step (the background evaluator's probes): kept, not printed, and
        placed before that step's training row, so that the rows stay in step order and the last row is
        still the last training step's."""
        at = bisect.bisect_left([r["step"] for r in self.rows], step)
        self.rows.insert(at, {"step": step, **values})
        if self._written is not None and at < self._written:
            self._written = None  # a row before those already on disk: the next flush rewrites the file

    def flush(self) -> None:
        if self._written is not None and is_local(self.fs):
            if self._written < len(self.rows):
                self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
                with open(self.path, "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in self.rows[self._written:]))
        else:
            write_bytes(self.fs, self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        self._written, self._flushed_at = len(self.rows), time.monotonic()


def _row(line: str) -> dict | None:
    """A metrics line as a row, or None when it is not one (cut short, not UTF-8, not JSON, no step)."""
    if not line or "\ufffd" in line:
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("step"), int)
    return row if ok and all(isinstance(v, (int, float)) for v in row.values()) else None


def progress_line(row: dict, total: int) -> str:
    """``step 40/60 | M0 nce 3.102 kl 0.081 | M1 nce 2.911 | 125.3 win/s`` (plus, from the pipeline, each
    stage's share of time waiting for input and for its consumer: ``S0 wait in 1% out 35%``)."""
    modules = sorted({int(k.split(".")[1]) for k in row if k.startswith("module.")})
    parts = [f"step {row['step']}/{total}"]
    for i in modules:
        s = f"M{i} nce {row[f'module.{i}.nce']:.3f}"
        if row.get(f"module.{i}.kl"):
            s += f" kl {row[f'module.{i}.kl']:.3f}"
        parts.append(s)
    if "windows_per_s" in row:
        parts.append(f"{row['windows_per_s']:.1f} win/s")
    stages = sorted({int(k.split(".")[1]) for k in row if k.endswith(".wait_input_frac")})
    if stages:
        parts.append(" ".join(f"S{s} wait in {row[f'stage.{s}.wait_input_frac']:.0%} "
                              f"out {row.get(f'stage.{s}.wait_consumer_frac', 0):.0%}" for s in stages))
    return " | ".join(parts)
