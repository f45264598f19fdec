#!/usr/bin/env bash
# Make a Debian base image without a container registry: debootstrap a minimal bookworm (its python3 is 3.11, which
# the CPU torch wheel fits) from a Debian mirror, then `docker import` it.
#
#   docker/base-image.sh [IMAGE] [MIRROR]     # defaults: cfnode-base:bookworm, the machine's Debian mirror
#
# Needs root, debootstrap and a running Docker engine; about 3 minutes and 190 MB. An image that already exists is
# kept (remove it to make it again).
set -euo pipefail

image=${1:-cfnode-base:bookworm}
mirror=${2:-}
docker=${DOCKER:-docker}

if "$docker" image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists"
    exit 0
fi
if [ -z "$mirror" ]; then
    # The mirror this machine's apt uses (deb822 or one-line sources), else Debian's own.
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+' | grep -v security | head -n 1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/cfnode-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$docker" import --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null
echo "base image $image made"
