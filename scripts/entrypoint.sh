#!/usr/bin/env bash
# The image's entry point: `docker run IMAGE train configs/vgim.yaml ...` runs `vgim train ...`;
# a command on the PATH (bash, ray start, as used by the Ray cluster launcher and KubeRay) runs as given.
set -e
if [ $# -gt 0 ] && command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec vgim "$@"
