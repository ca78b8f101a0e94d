#!/usr/bin/env bash
# The image's entry point: `docker run IMAGE train configs/vgim.yaml ...` runs `vgim train ...`;
# a program on the PATH (bash, ray start, as used by the Ray cluster launcher and KubeRay) runs as given.
# `type -P` finds programs only, so a vgim subcommand that is also a shell builtin (`eval`) goes to vgim.
set -e
if [ $# -gt 0 ] && type -P "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec vgim "$@"
