#!/usr/bin/env bash
# Build Shoal's two peer images and push them to your registry: no public registry holds them.
#
#   deploy/build-images.sh [--no-push] REGISTRY [TAG]
#
# builds docker/Dockerfile (CPU) as REGISTRY/shoal-peer:TAG and docker/Dockerfile.cuda (NVIDIA GPUs) as
# REGISTRY/shoal-peer:TAG-cuda from this checkout, pushes both (`docker login REGISTRY` first; --no-push
# only builds them), and prints the two names, one a line. TAG defaults to the version in pyproject.toml.
# REGISTRY is what goes before the image's name: ghcr.io/you, registry.example.org:5000/shoal, ...
# The Kubernetes manifests take the names through deploy/kubernetes/kustomization.yaml's `images`.
#
# Needs Docker with BuildKit (the default builder of current Docker) and a reachable engine. The CUDA
# image's base is about 4 GB; building it needs no GPU.
set -euo pipefail

USAGE="usage: deploy/build-images.sh [--no-push] REGISTRY [TAG]"
usage() {
	echo "$USAGE" >&2
	exit 2
}
die() {
	echo "build-images: $*" >&2
	exit 1
}

push=1
args=()
for arg in "$@"; do
	case $arg in
	--no-push) push=0 ;;
	-h | --help) echo "$USAGE" && exit 0 ;;
	-*) echo "build-images: unknown option $arg" >&2 && usage ;;
	*) args+=("$arg") ;;
	esac
done
[[ ${#args[@]} -ge 1 && ${#args[@]} -le 2 ]] || usage

cd "$(dirname "$0")/.."
registry=${args[0]%/}
# the [project] table's version = "X"
version=$(awk '/^\[/ { in_project = ($0 == "[project]") }
	in_project && /^version *= *"/ { gsub(/^version *= *"|".*$/, ""); print; exit }' pyproject.toml)
tag=${args[1]:-$version}
[[ -n $registry ]] || die "REGISTRY is empty"
[[ -n $tag ]] || die "no TAG given and no version found in pyproject.toml"
cpu="$registry/shoal-peer:$tag"
cuda="$registry/shoal-peer:$tag-cuda"

command -v docker >/dev/null ||
	die "docker not found: install Docker (https://docs.docker.com/engine/install/) or run this where it is"
docker info >/dev/null 2>&1 ||
	die "cannot reach a Docker engine (docker info fails): start it, or set DOCKER_HOST"

export DOCKER_BUILDKIT=1 # the CPU Dockerfile's wheel bind mount needs BuildKit (older engines default off)
echo "build-images: building $cpu (docker/Dockerfile)" >&2
docker build -f docker/Dockerfile -t "$cpu" .
echo "build-images: building $cuda (docker/Dockerfile.cuda)" >&2
docker build -f docker/Dockerfile.cuda -t "$cuda" .
if ((push)); then
	docker push "$cpu"
	docker push "$cuda"
	echo "build-images: pushed both. For the Kubernetes manifests, in deploy/kubernetes:" >&2
	echo "  kustomize edit set image shoal-peer=$cpu shoal-peer-cuda=$cuda" >&2
else
	echo "build-images: built both, pushed neither (--no-push)" >&2
fi
printf '%s\n' "$cpu" "$cuda"
