#!/usr/bin/env bash
# Set up a machine for vgim-dist: system packages, then .venv with the package and its pinned dependencies.
# The same script serves `make`, CI and the Docker image, so that CI proves the image's install steps.
#   scripts/setup.sh            system packages + .venv (dev extras included)
#   VENV=/opt/venv EXTRAS=      scripts/setup.sh   (the image: its own venv, no dev extras)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-dev}
APT_PACKAGES=(espeak-ng libsndfile1)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them first, e.g.  sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

stamp="$VENV/.vgim-installed"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$spec"
  touch "$stamp"
fi
