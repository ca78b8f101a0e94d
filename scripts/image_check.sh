#!/usr/bin/env bash
# Build the Docker image from ./Dockerfile and run it, on a machine without a Docker engine or a GPU: buildah
# (no daemon, --isolation chroot) builds the Dockerfile unchanged except for its base, a Debian root file
# system made by debootstrap instead of the CUDA runtime image (docs/cluster.md, "Checking the image").
#
#   scripts/image_check.sh          (make image-check; as root; downloads a few GB, takes tens of minutes)
#
# It then runs, inside the image, as its non-root user and through its entry point: vgim --version and
# --help, a synthetic corpus prepared, configs/smoke.yaml trained with the reference and the pipeline runner,
# a probe and the report, and a Ray head with the smoke job sent to it by cluster/submit.sh (ray job submit),
# until SUCCEEDED. Last, a source-only edit is rebuilt to show that the dependency layer is reused. It prints
# the image size, the cold build time and the warm rebuild time, and writes them to $WORK/figures.txt.
#
# Settings (environment): IMAGE_CHECK_DIR (default /var/tmp/vgim-image-check: base, storage, build context),
# DEBIAN_SUITE (bookworm), DEBIAN_MIRROR, STORAGE_DRIVER (overlay, else vfs). The image stays in that storage
# for a look inside (buildah --root $IMAGE_CHECK_DIR/storage ...); the next check replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

WORK=${IMAGE_CHECK_DIR:-/var/tmp/vgim-image-check}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_VERSION=3.11                 # Debian 12's python3 (the GPU base, Ubuntu 24.04, has 3.12)
BASE_IMAGE=localhost/vgim-base:$SUITE
IMAGE=localhost/vgim-dist:check
log() { printf '\nimage-check: %s\n' "$*" >&2; }
die() { printf 'image-check: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and buildah's chroot isolation need it)"
missing=()
for tool in buildah debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from the distribution"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
mkdir -p "$WORK"

# Storage: overlay where the kernel allows it, else vfs (a full copy per layer: slower, bigger).
driver=${STORAGE_DRIVER:-}
if [ -z "$driver" ]; then
  driver=overlay
  probe="$WORK/overlay-probe"
  mkdir -p "$probe"/{l,u,w,m}
  mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null \
    && umount "$probe/m" || driver=vfs
  rm -rf "$probe"
fi
B=(buildah --root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver "$driver")
log "buildah $("${B[@]}" --version | awk '{print $3}'), storage driver $driver, under $WORK"

# --- 1. the base: a minimal Debian with Python, as the CUDA image is a minimal Ubuntu ---------------------
if ! "${B[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  rootfs="$WORK/rootfs-$SUITE"
  if [ ! -f "$rootfs/.complete" ]; then
    log "debootstrap --variant=minbase $SUITE (a few minutes)"
    rm -rf "$rootfs"
    t0=$SECONDS
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
    # This machine reaches the package registries through a proxy with its own CA: the base trusts what the
    # host trusts, as a build machine's base image would. The Dockerfile is not touched.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    # Ubuntu's images (the CUDA base among them) hold a user `ubuntu` with uid 1000; so does this base, so that
    # the Dockerfile's own user is made the same way on both.
    chroot "$rootfs" useradd --create-home --uid 1000 ubuntu
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
    log "debootstrap took $((SECONDS - t0)) s"
  fi
  tar -C "$rootfs" --exclude=./.complete -cf "$WORK/base-$SUITE.tar" .
  ctr=$("${B[@]}" from scratch)
  "${B[@]}" add "$ctr" "$WORK/base-$SUITE.tar" / >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
  rm -f "$WORK/base-$SUITE.tar"
fi

# --- 2. the build context: this checkout's committed and untracked files, as a fresh clone has them --------
context="$WORK/context"
rm -rf "$context"
mkdir -p "$context"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | (cd "$REPO" && xargs -0 cp --parents -t "$context" 2>/dev/null || true)
cmp -s "$REPO/Dockerfile" "$context/Dockerfile" || die "build context incomplete"

build() {  # build the image; echo the seconds it took
  local t0=$SECONDS
  # --format docker: the image format `docker build` writes, in which the Dockerfile's SHELL applies (OCI has none)
  "${B[@]}" build --format docker --layers --pull=never --isolation chroot --network host \
    --build-arg "BASE=$BASE_IMAGE" --build-arg "PYTHON_VERSION=$PYTHON_VERSION" \
    -f "$context/Dockerfile" -t "$IMAGE" "$context" >"$1" 2>&1 || { tail -40 "$1" >&2; die "buildah build (log: $1)"; }
  echo $((SECONDS - t0))
}
deps_layer() {  # the image's layer stack up to and including the dependency install (DEPS_ONLY=1)
  local n
  n=$("${B[@]}" inspect --type image --format '{{range .OCIv1.History}}{{if not .EmptyLayer}}{{println .CreatedBy}}{{end}}{{end}}' "$IMAGE" \
      | grep -n 'DEPS_ONLY=1' | cut -d: -f1)
  "${B[@]}" inspect --type image --format '{{range .OCIv1.RootFS.DiffIDs}}{{println .}}{{end}}' "$IMAGE" | sed -n "1,${n}p"
}

# (This storage is the check's own: its working containers, left by an interrupted check, all go.)
"${B[@]}" rm --all >/dev/null 2>&1 || true
if [ "${IMAGE_CHECK_REUSE:-0}" = 1 ] && "${B[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1; then
  # Rerunning the checks inside the image after a failed one, the Dockerfile unchanged: no new cold build.
  cold="(not rebuilt: IMAGE_CHECK_REUSE=1; see $WORK/build-cold.log)"
else
  # Layers left from an earlier check would make the "cold" build warm.
  "${B[@]}" rmi --force "$IMAGE" >/dev/null 2>&1 || true
  "${B[@]}" rmi --prune >/dev/null 2>&1 || true
  log "cold build (downloads torch, Ray, DeepSpeed, MLflow and the rest: several GB)"
  cold=$(build "$WORK/build-cold.log")
fi
size=$("${B[@]}" images --format '{{.Size}}' "$IMAGE" | sed -n 1p)
base_size=$("${B[@]}" images --format '{{.Size}}' "$BASE_IMAGE" | sed -n 1p)
log "cold build: ${cold} s; image $size (the base alone: $base_size)"
deps_before=$(deps_layer)

# --- 3. runs inside the image, as its user, through its entry point -----------------------------------------
ctr=$("${B[@]}" from --pull=never "$IMAGE")
cleanup() { "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
run() {  # the image's entry point with these arguments, as the image's user (USER 1000), in /opt/vgim
  "${B[@]}" run --isolation chroot --network host "$ctr" -- /opt/vgim/scripts/entrypoint.sh "$@"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

log "runs as: $(run id)"
[ "$(run id -u)" = 1000 ] || die "the image does not run as uid 1000"
run --version | grep '^vgim-dist ' || die "vgim --version"
run --help | grep -c 'train' >/dev/null || die "vgim --help"
log "every vgim command through the entry point (eval and the other shell builtins' names included)"
run bash -c '
  set -e
  commands=$(python -c "from vgim_dist.cli import build_parser; p = build_parser(); print(*next(a for a in p._actions if a.dest == \"command\").choices)")
  for c in $commands; do
    /opt/vgim/scripts/entrypoint.sh "$c" --help | head -1 | grep -q "^usage: vgim $c" || { echo "vgim $c --help failed"; exit 1; }
  done
  echo "dispatched: $commands"
' || die "a vgim command did not reach vgim"
run bash -c 'python --version; python -c "import torch, ray, deepspeed, mlflow; print(\"torch\", torch.__version__, \"ray\", ray.__version__)"'
log "synthetic corpus"
run data synth deboer runs/check/corpus --words 16 --voices 2 --seed 0
run data prepare runs/check/corpus --format deboer --out runs/check/shards
run data prepare runs/check/corpus --format deboer --level syllable --syllable-split clean --out runs/check/syllables
log "smoke config, reference runner"
run train configs/smoke.yaml --set run.dir=runs/check/reference --set data.uri=runs/check/shards \
  --set run.runner=reference --set run.steps=20
log "smoke config, pipeline runner (a private Ray inside the container)"
run train configs/smoke.yaml --set run.dir=runs/check/pipeline --set data.uri=runs/check/shards \
  --set run.runner=pipeline --set run.steps=20 --set run.threads=1
log "probe and report"
run eval probe runs/check/pipeline --task syllables --data runs/check/syllables --standardize
run report runs/check/pipeline >/dev/null
run bash -c 'ls -l runs/check/pipeline/eval/report.html runs/check/pipeline/summary.json' || die "no report"

log "a Ray head in the container, the smoke job sent to it with cluster/submit.sh"
gcs=$(free_port) dash=$(free_port)
run bash -c "
  set -e
  export RAY_AUTH_MODE=disabled RAY_ADDRESS=http://127.0.0.1:$dash
  ray start --head --node-ip-address=127.0.0.1 --port=$gcs --dashboard-host=127.0.0.1 --dashboard-port=$dash \
    --num-cpus=2 --disable-usage-stats >/dev/null
  trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
  # ray start returns before the head's job agent has registered; until then a submission is refused with
  # \"No available agent to submit job\": submit again after a pause, as a script that starts a head must.
  for i in 1 2 3 4 5 6; do
    cluster/submit.sh --submission-id=image-check -- configs/smoke.yaml --set run.dir=/opt/vgim/runs/check/job \
      --set run.runner=pipeline --set run.steps=10 --set run.threads=1 2>&1 | tee /tmp/submit.log && ! grep -q 'No available agent' /tmp/submit.log && break
    grep -q 'No available agent' /tmp/submit.log || exit 1
    echo 'the head has no job agent yet: submitting again in 10 s'; sleep 10
  done
  status=\$(python -c \"from ray.job_submission import JobSubmissionClient as C; print(C('\$RAY_ADDRESS').get_job_status('image-check').value)\")
  echo \"job image-check: \$status\"
  [[ \$status == SUCCEEDED ]]
" || die "ray job submit"
run bash -c 'test -f runs/check/job/summary.json' || die "the submitted job wrote no summary"

log "the GPU image's Python (3.12): every pinned dependency resolves to a wheel for it (metadata only)"
# DeepSpeed is left out: it is published as a source distribution only and builds on any Python.
run bash -c '
  set -e
  mapfile -t deps < <(python -c "import tomllib; print(\"\n\".join(d for d in tomllib.load(open(\"pyproject.toml\", \"rb\"))[\"project\"][\"dependencies\"] if not d.startswith(\"deepspeed\")))")
  plat=(); for x in $(seq 5 39); do plat+=(--platform "manylinux_2_${x}_x86_64"); done
  python -m pip install --quiet --dry-run --ignore-installed --report /tmp/py312.json --python-version 3.12 \
    --implementation cp "${plat[@]}" --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
    --platform manylinux1_x86_64 --platform linux_x86_64 --only-binary=:all: "${deps[@]}"
  python -c "import json; i = json.load(open(\"/tmp/py312.json\"))[\"install\"]; print(len(i), \"wheels for Python 3.12, torch:\", [x[\"download_info\"][\"url\"].rsplit(\"/\", 1)[1] for x in i if x[\"metadata\"][\"name\"] == \"torch\"][0])"
' || die "a pinned dependency has no wheel for Python 3.12"

# --- 4. a source-only edit: the dependency layer must be reused -------------------------------------------
echo "# image-check: a source-only edit" >>"$context/vgim_dist/__init__.py"
log "warm rebuild after a source-only edit"
warm=$(build "$WORK/build-warm.log")
deps_after=$(deps_layer)
[ -n "$deps_before" ] && [ "$deps_before" = "$deps_after" ] || die "the dependency layer was rebuilt"
grep -q 'Using cache' "$WORK/build-warm.log" || die "no cached step in the warm rebuild"
if grep -qE 'Collecting torch|Downloading torch' "$WORK/build-warm.log"; then die "the warm rebuild reinstalled torch"; fi
size_warm=$("${B[@]}" images --format '{{.Size}}' "$IMAGE" | sed -n 1p)

commit=$(git -C "$REPO" rev-parse --short HEAD)
dirty=$(git -C "$REPO" status --porcelain --untracked-files=no | grep . >/dev/null && echo " (with uncommitted changes)" || true)
{
  echo "date: $(date -u +%Y-%m-%d)"
  echo "commit: $commit$dirty"
  echo "base: debootstrap --variant=minbase $SUITE (Python $PYTHON_VERSION), base image $base_size"
  echo "image size: $size (after the warm rebuild: $size_warm)"
  echo "cold build: $cold s"
  echo "warm rebuild after a source-only edit: $warm s (dependency layer reused)"
  echo "buildah $("${B[@]}" --version | awk '{print $3}'), storage driver $driver, $(nproc) cores"
} | tee "$WORK/figures.txt"
echo "image-check: passed"
