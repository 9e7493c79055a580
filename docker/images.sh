#!/usr/bin/env bash
# Build every image the compose swarm runs, where no container registry is reachable: the Debian base
# (docker/build-base.sh, once per engine data root), the wheels (docker/wheels.sh, incremental), then
# `compose build` (cached layers: seconds when nothing changed). Each step skips what already exists.
#
#   eval "$(docker/engine.sh start)" && docker/images.sh
#
# Needs a running engine (DOCKER_HOST and COMPOSE as engine.sh prints them), root and debootstrap the
# first time. SHOAL_BASE_IMAGE overrides the base tag (default shoal/base:bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${SHOAL_BASE_IMAGE:-shoal/base:bookworm}
: "${COMPOSE:?COMPOSE is not set: eval \"\$(docker/engine.sh start)\" first}"
say() { echo "images: $*" >&2; }

started=$SECONDS
docker image inspect "$BASE" >/dev/null 2>&1 || docker/build-base.sh "$BASE"
say "base $BASE ready after $((SECONDS - started)) s"
docker/wheels.sh
say "wheels ready after $((SECONDS - started)) s"
# --progress=quiet: BuildKit's step-by-step log is thousands of lines; on failure rerun without it
SHOAL_BASE_IMAGE=$BASE "$COMPOSE" --progress=quiet -f docker/compose.yaml build
say "shoal/peer:dev and shoal/net:dev built after $((SECONDS - started)) s"
