#!/usr/bin/env bash
# Runs the whole test suite (lint and mypy included) in the environment scripts/setup.sh made;
# without arguments, also the AVX2 rerun and the container check (scripts/container_check.sh).
# pytest exits non-zero when it collects no tests, so an empty run fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check pie_trio tests scripts
.venv/bin/python -m mypy
.venv/bin/python -m pytest -q -ra --durations=15 "$@"
# The real-model correctness tests again with torch held to its AVX2 kernels, as on a CPU without
# AVX-512: the default dtype and the kernels differ there, and a fault must not hide behind the
# kind of CPU CI happened to get.
if [ $# -eq 0 ]; then
    echo "test.sh: real-model correctness under ATEN_CPU_CAPABILITY=avx2"
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -q -ra \
        tests/test_model_real.py tests/test_model_hardware.py \
        "tests/test_runtime_inferlets.py::test_text_completion_equals_direct_generation_on_the_real_model"
fi
# The container path end to end: build the image from a clean clone, serve a completion through
# the published port, stop it. It skips (exit 0) only where podman cannot run at all.
if [ $# -eq 0 ]; then
    scripts/container_check.sh
fi
