#!/usr/bin/env bash
# The main job end to end on the CPU with embedded defaults: synthesise a small de Boer-style corpus with
# espeak-ng, prepare int16 Parquet shards, train the smoke config on them, probe it and write its report.
set -euo pipefail
cd "$(dirname "$0")/.."
VGIM=.venv/bin/vgim
RUN=runs/demo

rm -rf "$RUN"
$VGIM data synth deboer "$RUN/corpus" --words 64 --seed 0
$VGIM data prepare "$RUN/corpus" --format deboer --out "$RUN/shards"
$VGIM train configs/smoke.yaml --set run.dir="$RUN/train" --set data.uri="$RUN/shards" \
    --set tracking.model_name=vgim-demo
echo "demo: run directory $RUN/train (config.yaml, metrics.jsonl, summary.json, checkpoints/, mlflow.db)"

# Evaluate the run: syllable shards with the clean split, quick probes (z-scored: 40 steps leave features
# that barely vary from clip to clip), a short decoder, then the HTML report.
$VGIM data prepare "$RUN/corpus" --format deboer --level syllable --syllable-split clean --out "$RUN/syllables"
for task in syllables vowels; do
  $VGIM eval probe "$RUN/train" --task "$task" --data "$RUN/syllables" --standardize
done
$VGIM eval decoder "$RUN/train" --module 1 --loss mse+mel --steps 100 --batch-size 8
echo "demo: report $($VGIM report "$RUN/train")"
echo "demo: MLflow UI with: .venv/bin/vgim ui $RUN/train"
