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
# incremental: wheels already here are reused, so a rerun after a new dependency takes seconds
"$PYTHON" -m pip wheel --quiet --find-links docker/wheels --wheel-dir docker/wheels "$TORCH_SPEC" . setuptools
# the image builds Shoal from its source, so a stale Shoal wheel must not linger here
rm -f docker/wheels/shoal-*.whl
ls docker/wheels/torch-*.whl >/dev/null
case $(ls docker/wheels/torch-*.whl) in
*+cpu*) ;;
*) echo "wheels: warning: the torch wheel is not a +cpu build; the image will be large" >&2 ;;
esac
echo "wheels: $(ls docker/wheels/*.whl | wc -l) wheels, $(du -sh docker/wheels | cut -f1) in docker/wheels" >&2
