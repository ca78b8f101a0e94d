"""Training step time with the background evaluator (eval.every) on and off, in one invocation.

    .venv/bin/python benchmarks/evaluator.py [--words 16] [--steps 60] [--every 10]

Synthesises a small de Boer corpus, prepares word and syllable shards, then trains the smoke config twice on
the reference runner (checkpoint every ``--every`` steps): without the evaluator, and with it probing every
checkpoint. Prints the median ``step_time_s`` of each (the first logged window, the warm-up, left out), their
ratio, and the probe points the evaluator logged. On a machine with fewer cores than trainer threads plus the
evaluator's, the two share the CPU: the evaluator is niced, so the ratio shows what that costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from vgim_dist.cli import main as data_main
from vgim_dist.config import load_config
from vgim_dist.data.synth import synth_deboer
from vgim_dist.launch import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--words", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vgim-bench-eval-") as d:
        root = Path(d)
        synth_deboer(root / "corpus", words=a.words, voices_n=2, seed=0)
        words, syllables = str(root / "words"), str(root / "syllables")
        data_main(["data", "prepare", str(root / "corpus"), "--format", "deboer", "--out", words])
        data_main(["data", "prepare", str(root / "corpus"), "--format", "deboer", "--level", "syllable",
                   "--syllable-split", "clean", "--out", syllables])
        medians = {}
        for mode in ("off", "on"):
            run = root / f"run-{mode}"
            extra = ["eval.every=1", f"eval.data={syllables}", "eval.tasks=[syllables]"] if mode == "on" else []
            train(load_config("configs/smoke.yaml", [
                f"run.dir={run}", f"data.uri={words}", f"run.steps={a.steps}", "run.log_every=5",
                f"checkpoint.every={a.every}", *extra]))
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
            medians[mode] = statistics.median(times)
            probes = sorted(r["step"] for r in rows if "probe.syllables.module.0" in r)
            print(f"evaluator {mode}: median step {medians[mode] * 1000:.1f} ms over {len(times)} windows"
                  + (f"; probe points at steps {probes}" if mode == "on" else ""))
        print(f"step time with / without the evaluator: {medians['on'] / medians['off']:.2f}")


if __name__ == "__main__":
    main()
