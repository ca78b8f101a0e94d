#!/usr/bin/env bash
# Submit a training run to a Ray cluster: the same `vgim train` as on a laptop, run by a driver on the cluster
# with this checkout as its working directory.
#
#   RAY_ADDRESS=http://<head>:8265 cluster/submit.sh configs/vgim.yaml --set run.dir=s3://bucket/runs/x
#   RAY_ADDRESS=... cluster/submit.sh --submission-id=vgim-1 --no-wait -- configs/vgim.yaml --resume
#
# Options before a `--` go to `ray job submit`, the rest to `vgim train`. A head started with token
# authentication (the default since Ray 2.59) needs RAY_AUTH_MODE=token here too.
set -euo pipefail
cd "$(dirname "$0")/.."

submit_args=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $1 != -- ]]; do
    submit_args+=("$1")
    shift
  done
  shift
fi
exec ray job submit --working-dir . "${submit_args[@]}" -- vgim train "$@"
