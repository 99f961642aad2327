"""Tensor ops of the model: torch reference implementations (`torch_ops`) for CPU and CUDA,
and, later, raw CUDA kernels loaded through CuPy (`cuda/`)."""
