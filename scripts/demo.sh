#!/usr/bin/env bash
# The main job end to end on the CPU with embedded defaults: synthesise a small de Boer-style corpus with
# espeak-ng, prepare int16 Parquet shards, train the smoke config on them.
set -euo pipefail
cd "$(dirname "$0")/.."
VGIM=.venv/bin/vgim
RUN=runs/demo

rm -rf "$RUN"
$VGIM data synth deboer "$RUN/corpus" --words 64 --seed 0
$VGIM data prepare "$RUN/corpus" --format deboer --out "$RUN/shards"
$VGIM train configs/smoke.yaml --set run.dir="$RUN/train" --set data.uri="$RUN/shards"
echo "demo: run directory $RUN/train (config.yaml, metrics.jsonl, summary.json, checkpoints/)"
