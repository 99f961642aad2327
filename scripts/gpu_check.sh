#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA device: installs CuPy when missing, then runs the
# kernel tests, the model's CUDA tests and a quick benchmark. Run from anywhere:
#     bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || scripts/setup.sh
if ! "$PY" -c "import cupy" 2>/dev/null; then
    # CuPy's wheel must match the driver's CUDA major version (13 here, 12 on older drivers).
    major=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
    .venv/bin/pip install "cupy-cuda${major:-13}x"
fi
"$PY" -c "from pie_trio.kernels import cuda_kernels as k; r = k.unavailable_reason(); \
print('raw kernels:', r or 'available'); raise SystemExit(1 if r else 0)"
# The model tests run through the raw kernels (they are off by default until this passes).
export PIE_TRIO_CUDA_KERNELS=1
"$PY" -m pytest -q -ra tests/test_kernels_ptx.py tests/test_kernels_dispatch.py \
    tests/test_kernels_gpu.py tests/test_model_gpu.py
"$PY" scripts/bench_gpu.py --quick
