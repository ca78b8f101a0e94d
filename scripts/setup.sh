#!/usr/bin/env bash
# Set up a machine for vgim-dist: system packages, then .venv with the package and its pinned dependencies.
# The same script serves `make`, CI and the Docker image, so that CI proves the image's install steps.
#   scripts/setup.sh            system packages + .venv (dev extras included)
#   VENV=/opt/venv EXTRAS=      scripts/setup.sh   (the image: its own venv, no dev extras)
#   DEPS_ONLY=1 scripts/setup.sh                     dependencies only (the image's cached layer)
#   PYTHON=python3.12 scripts/setup.sh               the interpreter the venv is made from (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-dev}
# Speech engines and voices for the synthetic corpora (vgim_dist/data/synth.py), all from the distribution.
APT_PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts libsndfile1)
# A headless browser for the tests that look at the MLflow UI and the HTML report (not in the image).
if [[ ",$EXTRAS," == *",dev,"* ]]; then APT_PACKAGES+=(chromium); fi
# (python3 -> python3-venv, python3.12 -> python3.12-venv)
"$PYTHON" -m venv --help >/dev/null 2>&1 || APT_PACKAGES+=("$(basename "$PYTHON")-venv")

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
      | grep --line-buffered -E '^(Get|Setting up)' || true
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them first, e.g.  sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# pip's own progress (one line per package, a bar per download): a fresh install takes minutes.
pip=("$VENV/bin/python" -m pip install --progress-bar on --disable-pip-version-check)
install() {  # pip install, showing what it downloads and installs, not what is there already
  "${pip[@]}" "$@" | { grep --line-buffered -v '^Requirement already satisfied' || true; }
}

if [ "${DEPS_ONLY:-0}" = 1 ]; then
  # The dependencies named in pyproject.toml, without the package: a layer that survives source edits.
  "${pip[@]}" --quiet --upgrade pip
  mapfile -t deps < <("$VENV/bin/python" - "$EXTRAS" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [e for e in sys.argv[1].split(",") if e]
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))
PY
  )
  echo "setup: installing the dependencies into $VENV (a few minutes on a fresh machine)"
  install "${deps[@]}"
  exit 0
fi

stamp="$VENV/.vgim-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  echo "setup: installing vgim-dist and its dependencies into $VENV (a few minutes on a fresh machine)"
  "${pip[@]}" --quiet --upgrade pip
  install -e "$spec"
  touch "$stamp"
  echo "setup: done"
fi
