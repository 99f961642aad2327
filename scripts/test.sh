#!/usr/bin/env bash
# Runs the whole test suite (lint included) in the environment scripts/setup.sh made.
# pytest exits non-zero when it collects no tests, so an empty run fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check pie_trio kernels tests scripts
.venv/bin/python -m pytest -q -ra --durations=15 "$@"
