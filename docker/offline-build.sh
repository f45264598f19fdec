#!/usr/bin/env bash
# Build the cfnode image on a machine that reaches package registries but no container registry:
#   1. a Debian base image made with debootstrap (docker/base-image.sh),
#   2. a wheelhouse in docker/wheels: torch (CPU build), cfnode's dependencies and setuptools, made on this host
#      with `pip wheel` (any Python 3.11 pip; sdists are built into wheels here, so the image build needs no compiler),
#   3. docker build with --build-arg BASE_IMAGE=... --build-arg OFFLINE=1 and no network: nothing is downloaded
#      inside it.
#
#   docker/offline-build.sh [TAG]            # default cfnode:latest, the tag docker/compose.yml runs
#
# Environment: DOCKER (the client, default docker), BASE_IMAGE (default cfnode-base:bookworm), PYTHON (the pip that
# makes the wheels, default python3), TORCH_SPEC (default torch==2.13.0+cpu: an open torch would resolve to a CUDA
# build of several GB; where the CPU wheel is not on a local find-links, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-cfnode:latest}
docker=${DOCKER:-docker}
base=${BASE_IMAGE:-cfnode-base:bookworm}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0+cpu}
wheels=docker/wheels

started=$(date +%s)
DOCKER="$docker" docker/base-image.sh "$base"
echo "base image: $(( $(date +%s) - started )) s"

step=$(date +%s)
"$python" - >"$wheels/requirements.txt" <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
echo "setuptools>=77" >>"$wheels/requirements.txt"
"$python" -m pip wheel --quiet --wheel-dir "$wheels" "$torch_spec" -r "$wheels/requirements.txt"
rm "$wheels/requirements.txt"
echo "wheelhouse: $(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1), $(( $(date +%s) - step )) s"

step=$(date +%s)
"$docker" build --network none -f docker/Dockerfile --build-arg BASE_IMAGE="$base" --build-arg OFFLINE=1 -t "$tag" .
echo "image $tag: $(( $(date +%s) - step )) s; all: $(( $(date +%s) - started )) s"
