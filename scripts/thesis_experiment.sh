#!/usr/bin/env bash
# The published experiment as one command (docs/experiments.md): a thin wrapper around the sweep
# configs/sweeps/thesis.yaml. It prepares the shards of a de Boer-format corpus, runs the sweep (GIM and V-GIM
# with the thesis architecture, SEEDS seeds each, every trial probed with the thesis's protocol on raw and on
# z-scored features), then writes the sweep's report and the comparison beside the thesis's published table.
#
#   scripts/thesis_experiment.sh CORPUS OUT
#
# CORPUS holds reshuffledv2/{train,test}/ and "split up data padded"/{train,test}/ (the de Boer layout, or
# `vgim data synth deboer CORPUS --words 729 --voices 1 --second-takes 122` for a full-size synthetic
# stand-in: 851 word recordings, 680 train / 171 test, as published). Environment: SEEDS (5), STEPS (the
# configs' 3200), REPEATS (probe repeats per module, 5), EPOCHS (probe epochs, 100), DEVICE (cpu). After a
# stop the same command resumes the sweep: finished trials are kept, unfinished ones continue.
set -euo pipefail
cd "$(dirname "$0")/.."
VGIM=${VGIM:-.venv/bin/vgim}
[ $# -eq 2 ] || { echo "usage: $0 CORPUS OUT" >&2; exit 2; }
CORPUS=$1 OUT=$2
SEEDS=${SEEDS:-5} REPEATS=${REPEATS:-5} EPOCHS=${EPOCHS:-100} DEVICE=${DEVICE:-cpu}
[ -d "$CORPUS/reshuffledv2" ] || { echo "$CORPUS: no reshuffledv2/ folder (not a de Boer-format corpus)" >&2; exit 2; }

mkdir -p "$OUT"
[ -f "$OUT/words/manifest.json" ] || $VGIM data prepare "$CORPUS" --format deboer --level word --out "$OUT/words"
[ -f "$OUT/syllables/manifest.json" ] ||
  $VGIM data prepare "$CORPUS" --format deboer --level syllable --syllable-split clean --out "$OUT/syllables"

sweep=(--set dir="$OUT/sweep" --set set.data.uri="$OUT/words" --set set.run.device="$DEVICE"
       --set "space.seed=[$(seq -s, 0 $((SEEDS - 1)))]" ${STEPS:+--set set.run.steps="$STEPS"})
for i in 0 1 2 3; do
  sweep+=(--set "eval.$i.data=$OUT/syllables" --set "eval.$i.repeats=$REPEATS" --set "eval.$i.epochs=$EPOCHS")
done
resume=$([ -f "$OUT/sweep/sweep.json" ] && echo --resume || true)
$VGIM sweep configs/sweeps/thesis.yaml "${sweep[@]}" $resume
$VGIM report "$OUT/sweep"
$VGIM report "$OUT"/sweep/trials/* --out "$OUT/report.html"
echo "thesis: sweep report $OUT/sweep/report.html, comparison table $OUT/report.md, report $OUT/report.html"
