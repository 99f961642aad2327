"""Tensor ops of the model: torch reference implementations (`kernels.ops`) for CPU and CUDA,
and, later, raw CUDA kernels loaded through CuPy (`kernels/cuda/`)."""
