#!/usr/bin/env bash
# Build the export and CPU server images with no image registry and no package index inside the build:
#   1. a Debian 12 root filesystem with Python 3.11 (mmdebstrap, from Debian's packages), `docker import`ed
#      as the base image;
#   2. a wheelhouse (pip download on this machine, Python 3.11, the same wheels the images need), copied
#      into ./wheelhouse;
#   3. `docker build --network none --build-arg PIP_NO_INDEX=1` of Dockerfile.export and Dockerfile.server,
#      tagged as docker-compose.yml (+ docker-compose.cpu.yml) expects: charrnn-export:TAG, charrnn-server-cpu:TAG.
# The base tar and the wheelhouse are cached in $CHARRNN_OFFLINE_CACHE (default ~/.cache/charrnn-offline),
# keyed by what they are made from; a second run rebuilds only what changed. Needs root for mmdebstrap (or
# an existing cache), a running Docker engine, and python3.11 with pip. `make offline-images` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${CHARRNN_OFFLINE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/charrnn-offline}
TAG=${CHARRNN_IMAGE_TAG:-0.1.0}
PYTHON=${PYTHON:-python3}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
mkdir -p "$CACHE"
say() { printf 'offline-images: %s\n' "$*"; }
hash_of() { sha256sum | cut -c1-12; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { say "$PYTHON is not Python 3.11: the wheels must match the base image's Python 3.11" >&2; exit 1; }

# ---- 1. base image ----
base_key=$(printf 'mmdebstrap --variant=apt --include=%s %s' "$PACKAGES" "$SUITE" | hash_of)
base_tar=$CACHE/base-$SUITE-$base_key.tar
base_image=charrnn-base:$SUITE-$base_key
if [ ! -f "$base_tar" ] || [ ! -s "$base_tar" ]; then
  say "making the Debian $SUITE base with mmdebstrap ($PACKAGES)"
  # The output format follows the file name's extension: keep .tar on the partial file.
  mmdebstrap --quiet --variant=apt --include="$PACKAGES" "$SUITE" "$CACHE/partial-base-$base_key.tar"
  mv "$CACHE/partial-base-$base_key.tar" "$base_tar"
else
  say "base: cached $base_tar"
fi
if ! docker image inspect "$base_image" >/dev/null 2>&1; then
  docker import --message "mmdebstrap $SUITE $PACKAGES" "$base_tar" "$base_image" >/dev/null
fi
say "base image: $base_image"

# ---- 2. wheelhouse ----
torch=$("$PYTHON" docker/requirements.py --extra export | sed -n 's/^torch==\([0-9.]*\)$/\1/p')
[ -n "$torch" ] || { say "no torch==X pin in the export extra" >&2; exit 1; }
wheel_key=$(cat pyproject.toml docker/requirements.py docker/offline-images.sh | hash_of)
wheels=$CACHE/wheelhouse-$wheel_key
if [ ! -f "$wheels/.complete" ]; then
  say "downloading the wheelhouse (torch==$torch+cpu, the project's dependencies with onnxruntime, setuptools)"
  rm -rf "$wheels.partial" && mkdir -p "$wheels.partial"
  # torch's CPU build: from a local --find-links folder ($PIP_FIND_LINKS) if it has it, else the PyTorch CPU index.
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --no-index -d "$wheels.partial" "torch==$torch+cpu" \
    || "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --index-url "$TORCH_INDEX_URL" \
         -d "$wheels.partial" "torch==$torch+cpu"
  "$PYTHON" docker/requirements.py --onnxruntime onnxruntime --extra export > "$wheels.partial/requirements.txt"
  "$PYTHON" -m pip download --quiet --only-binary=:all: --find-links "$wheels.partial" -d "$wheels.partial" \
    --requirement "$wheels.partial/requirements.txt" "torch==$torch+cpu" "setuptools>=68"
  touch "$wheels.partial/.complete"
  rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
else
  say "wheelhouse: cached $wheels"
fi
find wheelhouse -mindepth 1 ! -name README.md -delete
cp -l "$wheels"/*.whl wheelhouse/ 2>/dev/null || cp "$wheels"/*.whl wheelhouse/
say "wheelhouse: $(find wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"

# ---- 3. images, built with no network ----
export DOCKER_BUILDKIT=0  # the classic builder: BuildKit would fetch its Dockerfile frontend from a registry
build() {
  local file=$1 image=$2; shift 2
  say "building $image ($file)"
  docker build --quiet --network none --file "$file" --tag "$image" \
    --build-arg BASE_IMAGE="$base_image" --build-arg PIP_NO_INDEX=1 "$@" . >/dev/null
}
build Dockerfile.export "charrnn-export:$TAG"
build Dockerfile.server "charrnn-server-cpu:$TAG" --build-arg ONNXRUNTIME=onnxruntime
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^charrnn-(export|server-cpu):$TAG " \
  | sed 's/^/offline-images: built /'
