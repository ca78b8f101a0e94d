#!/usr/bin/env bash
# The main job end to end on the CPU with embedded defaults: train the smoke config and show where it went.
set -euo pipefail
cd "$(dirname "$0")/.."
VGIM=.venv/bin/vgim
RUN=runs/demo

rm -rf "$RUN"
$VGIM train configs/smoke.yaml --set run.dir=$RUN
echo "demo: run directory $RUN (config.yaml, metrics.jsonl, summary.json, checkpoints/)"
