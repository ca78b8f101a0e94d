#!/usr/bin/env bash
# Set up a machine for vgim-dist: system packages, then .venv with the package and its pinned dependencies.
# The same script serves `make`, CI and the Docker image, so that CI proves the image's install steps.
#   scripts/setup.sh            system packages + .venv (dev extras included)
#   VENV=/opt/venv EXTRAS=      scripts/setup.sh   (the image: its own venv, no dev extras)
#   DEPS_ONLY=1 scripts/setup.sh                     dependencies only (the image's cached layer)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-dev}
# Speech engines and voices for the synthetic corpora (vgim_dist/data/synth.py), all from the distribution.
APT_PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts libsndfile1)
# Development: headless Chromium renders the HTML report in its test.
if [[ ",$EXTRAS," == *",dev,"* ]]; then APT_PACKAGES+=(chromium); fi
python3 -m venv --help >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv)

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

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet)

if [ "${DEPS_ONLY:-0}" = 1 ]; then
  # The dependencies named in pyproject.toml, without the package: a layer that survives source edits.
  "${pip[@]}" --upgrade pip
  mapfile -t deps < <("$VENV/bin/python" - "$EXTRAS" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in sys.argv[1].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))
PY
  )
  "${pip[@]}" "${deps[@]}"
  exit 0
fi

stamp="$VENV/.vgim-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  "${pip[@]}" --upgrade pip
  "${pip[@]}" -e "$spec"
  touch "$stamp"
fi
