#!/usr/bin/env bash
# Builds the llorch image without a container registry (this machine, CI): a Debian bookworm
# base made with debootstrap and `docker import`ed, the three binaries built on the host (also
# bookworm, so the same glibc), and deploy/Dockerfile's runtime stage on top — the same stage
# the registry path (`docker-compose up --build`) builds.
#
#   deploy/build-offline.sh            # base (reused when present), binaries, image
#
# Idempotent: the base image `llorch-base:bookworm` is made once and reused; cargo rebuilds
# only what changed. Prints the image name on its last line. Needs root (or sudo) for
# debootstrap; installs debootstrap with apt when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${LLORCH_BASE_IMAGE:-llorch-base:bookworm}
IMAGE=${LLORCH_IMAGE:-llorch}
MIRROR=${LLORCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
# Every cargo command on a shared machine runs under this lock (one build at a time).
CARGO_LOCK=${LLORCH_CARGO_LOCK:-/tmp/cargo.lock}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
log() { echo "build-offline: $*" >&2; }

# 1. The base image: a minimal Debian bookworm (apt, dpkg, bash, coreutils), ~100 MB.
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "reusing base image $BASE_IMAGE"
else
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    fi
    rootfs=$(mktemp -d /tmp/llorch-rootfs.XXXXXX)
    trap 'as_root rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm into $rootfs (from $MIRROR)"
    started=$(date +%s)
    as_root debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
    # What debian:bookworm-slim also does: no apt caches or docs kept in image layers.
    as_root rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/*
    log "importing the base as $BASE_IMAGE"
    as_root tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
    trap - EXIT
    log "base image made in $(($(date +%s) - started)) s"
fi

# 2. The binaries, on the host (Debian 12 as well: the glibc the runtime stage has).
log "cargo build --release (binaries for the image)"
flock "$CARGO_LOCK" cargo build --release --locked -q \
    -p llorch-tokenizer -p llorch-engine -p llorch-gateway
rm -rf deploy/prebuilt
mkdir -p deploy/prebuilt
for bin in llorch-tokenizer llorch-engine llorch-gateway; do
    cp "$TARGET_DIR/release/$bin" deploy/prebuilt/
    # The line tables stay (backtraces name lines), compressed: a third of the size.
    objcopy --compress-debug-sections=zlib "deploy/prebuilt/$bin"
done

# 3. The image: deploy/Dockerfile with both stages on the base and the binaries from above.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit-dirty"
fi
tag="$IMAGE:$version-$commit"
log "docker build $tag"
DOCKER_BUILDKIT=0 docker build -q -f deploy/Dockerfile \
    --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
    --build-arg BINARIES=prebuilt \
    --build-arg VERSION="$version" \
    --build-arg GIT_COMMIT="$commit" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$tag" -t "$IMAGE:$version" -t "$IMAGE:latest" . >/dev/null
rm -rf deploy/prebuilt
# The build stage, and the previous llorch image if this build took over its tags.
docker image prune -f --filter label=llorch.stage=build >/dev/null
docker image prune -f --filter label=org.opencontainers.image.title=llorch >/dev/null
log "image $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$tag"
