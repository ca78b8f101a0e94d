#!/usr/bin/env bash
# The main job end to end on the CPU with embedded defaults: synthesise the default de Boer-style corpus (64
# words x 4 speakers from three speech engines, noise, reverberation: docs/data.md), prepare word shards and
# clean-split syllable shards, train the smoke config on the words with probe curves while it trains, probe
# it beside its step-0 baseline and write its report.
set -euo pipefail
cd "$(dirname "$0")/.."
VGIM=.venv/bin/vgim
RUN=runs/demo

rm -rf "$RUN"
$VGIM data synth deboer "$RUN/corpus" --seed 0
$VGIM data prepare "$RUN/corpus" --format deboer --out "$RUN/shards"
$VGIM data prepare "$RUN/corpus" --format deboer --level syllable --syllable-split clean --out "$RUN/syllables"
$VGIM train configs/smoke.yaml --set run.dir="$RUN/train" --set data.uri="$RUN/shards" \
    --set tracking.model_name=vgim-demo \
    --set eval.every=1 --set eval.data="$RUN/syllables" --set eval.tasks="[syllables]"
echo "demo: run directory $RUN/train (config.yaml, metrics.jsonl, summary.json, checkpoints/, mlflow.db)"

# Evaluate the run: probes on z-scored features (a short training leaves features that barely vary from
# clip to clip) and the thesis's syllable probe (raw, flattened C x T), each beside the same probe on the
# encoder as initialised; a short decoder; the report, whose first lines say what the run shows.
for task in syllables vowels; do
  $VGIM eval probe "$RUN/train" --task "$task" --data "$RUN/syllables" --standardize
done
$VGIM eval probe "$RUN/train" --task syllables --data "$RUN/syllables" --features flatten
$VGIM eval decoder "$RUN/train" --module 1 --loss mse+mel --steps 100 --batch-size 8
$VGIM report "$RUN/train" > "$RUN/report.txt"
echo
echo "demo: what it shows"
sed '$d' "$RUN/report.txt"
echo "demo: report $(tail -1 "$RUN/report.txt")"
echo "demo: MLflow UI with: .venv/bin/vgim ui $RUN/train"
