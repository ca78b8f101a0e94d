#!/usr/bin/env bash
# The published experiment as one command (docs/experiments.md): GIM and V-GIM with the thesis architecture
# (configs/{gim,vgim}-thesis.yaml), SEEDS seeds each, trained on the words of a de Boer-format corpus; then
# syllable and vowel probes on every module (clean syllable split; raw and z-scored features), and one
# report comparing the methods.
#
#   scripts/thesis_experiment.sh CORPUS OUT
#
# CORPUS holds reshuffledv2/{train,test}/ and "split up data padded"/{train,test}/ (the de Boer layout, or
# `vgim data synth deboer CORPUS --words 532 --takes 2` for a full-size synthetic stand-in with 851 training
# words). Environment: SEEDS (5), STEPS (the configs' 4000), REPEATS (probe repeats per module, 5),
# DEVICE (cpu). A finished run (summary.json present) is skipped and an interrupted one resumed, so the
# command can simply be run again after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
VGIM=${VGIM:-.venv/bin/vgim}
[ $# -eq 2 ] || { echo "usage: $0 CORPUS OUT" >&2; exit 2; }
CORPUS=$1 OUT=$2
SEEDS=${SEEDS:-5} REPEATS=${REPEATS:-5} DEVICE=${DEVICE:-cpu}
[ -d "$CORPUS/reshuffledv2" ] || { echo "$CORPUS: no reshuffledv2/ folder (not a de Boer-format corpus)" >&2; exit 2; }

mkdir -p "$OUT"
$VGIM data prepare "$CORPUS" --format deboer --level word --out "$OUT/words"
$VGIM data prepare "$CORPUS" --format deboer --level syllable --syllable-split clean --out "$OUT/syllables"

runs=()
for method in gim vgim; do
  for ((seed = 0; seed < SEEDS; seed++)); do
    run="$OUT/$method-seed$seed"
    runs+=("$run")
    if [ ! -f "$run/summary.json" ]; then
      resume=$([ -d "$run/checkpoints" ] && echo --resume || true)
      SECONDS=0
      $VGIM train "configs/$method-thesis.yaml" $resume --set seed="$seed" --set run.dir="$run" \
        --set data.uri="$OUT/words" --set run.device="$DEVICE" ${STEPS:+--set run.steps="$STEPS"} \
        --set tracking.enabled=true
      echo "thesis: trained $run in ${SECONDS}s"
    fi
    for task in syllables vowels; do  # raw features (docs/method.md), and z-scored per channel (docs/evaluation.md)
      for scale in "" --standardize; do
        $VGIM eval probe "$run" --task "$task" --data "$OUT/syllables" --all --repeats "$REPEATS" --few-labels $scale
      done
    done
  done
done
$VGIM report "${runs[@]}" --out "$OUT/report.html"
echo "thesis: comparison table $OUT/report.md, report $OUT/report.html"
