#!/usr/bin/env bash
# Build a local Debian bookworm base image with debootstrap and `docker import`, for machines that can
# reach a Debian mirror but no container registry. It carries what Shoal's images would otherwise
# apt-get on top of python:3.11-slim (Python 3.11 with venv, iproute2, nftables, coturn), so building
# FROM it needs no network at all.
#
#   docker/build-base.sh [TAG]        # default TAG: shoal/base:bookworm
#
# Then build with --build-arg BASE_IMAGE=TAG (compose: SHOAL_BASE_IMAGE=TAG). Needs root, debootstrap
# and a running engine (docker/engine.sh start). MIRROR overrides the mirror taken from apt's sources.
set -euo pipefail

TAG=${1:-shoal/base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,iproute2,nftables,coturn,util-linux,procps

[[ $EUID -eq 0 ]] || {
	echo "build-base: needs root (debootstrap)" >&2
	exit 1
}
command -v debootstrap >/dev/null || {
	echo "build-base: debootstrap not found; apt-get install debootstrap" >&2
	exit 1
}
if docker image inspect "$TAG" >/dev/null 2>&1; then
	echo "build-base: $TAG exists; remove it (docker rmi $TAG) to rebuild" >&2
	exit 0
fi

if [[ -z ${MIRROR:-} ]]; then
	# the first Debian archive apt uses here: deb822 `URIs:` or one-line `deb URI SUITE`
	MIRROR=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null |
		grep -v security | grep -oE 'https?://[^ ]+/debian/?' | head -1 || true)
	MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

ROOTFS=$(mktemp -d /var/tmp/shoal-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "build-base: debootstrap $SUITE from $MIRROR (about 30 s)" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
# coturn is a tool here, not a service of the image; the shell image needs no apt state
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" --numeric-owner -c . |
	docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "build-base: built $TAG" >&2
