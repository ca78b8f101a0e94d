"""Per-step metrics: kept as rows, written to ``<run.dir>/metrics.jsonl``, shown as a live console line."""

from __future__ import annotations

import json
import sys

import torch

from vgim_dist.storage import open_dir, read_bytes, write_bytes


class MetricsLog:
    """Rows of ``{"step": N, "<name>": value, ...}``; on resume, rows past the checkpoint are dropped so that
    no step appears twice."""

    def __init__(self, run_dir: str, total_steps: int, endpoint_url: str = "", stream=sys.stderr):
        self.fs, root = open_dir(run_dir, endpoint_url)
        self.path = f"{root}/metrics.jsonl"
        self.total = total_steps
        self.stream = stream
        self.rows: list[dict] = []

    def resume(self, step: int) -> None:
        try:
            text = read_bytes(self.fs, self.path).decode()
        except FileNotFoundError:
            return
        self.rows = [r for r in map(json.loads, filter(None, text.splitlines())) if r["step"] <= step]

    def record(self, step: int, values: dict[str, torch.Tensor | float]) -> dict:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        self.stream.write(progress_line(row, self.total) + "\n")
        self.stream.flush()
        return row

    def flush(self) -> None:
        write_bytes(self.fs, self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())


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
