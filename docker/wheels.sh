#!/usr/bin/env bash
# Fill docker/wheels with every wheel the peer image needs (torch, Shoal's dependencies, setuptools to
# build Shoal), built or fetched on this machine with its own pip configuration, so that `docker build`
# installs offline: for machines whose containers reach no index (no registry, a TLS-intercepting proxy).
#
#   docker/wheels.sh            # TORCH_SPEC overrides torch==2.13.0 (a CPU wheel must be findable)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
	{ echo "wheels: needs Python 3.11 (the images' Python)" >&2; exit 1; }
STAMP=docker/wheels/.stamp # what the wheels here were made for: the dependencies and the torch spec
want=$( (cat pyproject.toml; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]] && ls docker/wheels/torch-*.whl >/dev/null 2>&1; then
	echo "wheels: docker/wheels is current" >&2
	exit 0
fi
# incremental: wheels already here are reused, so a rerun after a new dependency takes seconds
# (pip's "Location ... is ignored" lines are about this machine's local indexes lacking a package: noise)
"$PYTHON" -m pip wheel --quiet --find-links docker/wheels --wheel-dir docker/wheels "$TORCH_SPEC" . setuptools \
	2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# the image builds Shoal from its source, so a stale Shoal wheel must not linger here
rm -f docker/wheels/shoal-*.whl
ls docker/wheels/torch-*.whl >/dev/null
case $(ls docker/wheels/torch-*.whl) in
*+cpu*) ;;
*) echo "wheels: warning: the torch wheel is not a +cpu build; the image will be large" >&2 ;;
esac
echo "$want" >"$STAMP"
echo "wheels: $(ls docker/wheels/*.whl | wc -l) wheels, $(du -sh docker/wheels | cut -f1) in docker/wheels" >&2
