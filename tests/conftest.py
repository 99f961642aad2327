"""Shared fixtures: a tiny random-weight model for fast tests, the real default model for
correctness tests.

- `tiny_runner`: a fresh `ModelRunner` (its own KV pool) on the tiny model, fp32, 64 pages of 16
  slots. Call `pie_trio.model.tiny.tiny_runner(...)` directly for other sizes.
- `real_runner`: SmolLM2-135M-Instruct in bf16 on the CPU, loaded once per test session and
  shared: tests must free what they allocate and not rely on pool contents.
- `dtype_runner`: the same model once per dtype the CPU path serves: "default" (what
  `pie-trio serve` picks for this CPU), "bf16" and "fp32". The correctness tests that matter
  run on each, so a CPU whose default differs (AVX2 only vs AVX-512 BF16) cannot hide a fault.
"""

from __future__ import annotations

import pytest

from pie_trio.model import ModelRunner
from pie_trio.model.tiny import tiny_runner as make_tiny_runner


@pytest.fixture
def tiny_runner() -> ModelRunner:
    return make_tiny_runner()


_REAL_RUNNERS: dict[str, ModelRunner] = {}


def load_real_runner(dtype: str) -> ModelRunner:
    """The real model in `dtype` ("default", "bf16" or "fp32"), loaded once per session."""
    if dtype not in _REAL_RUNNERS:
        asked = None if dtype == "default" else dtype
        _REAL_RUNNERS[dtype] = ModelRunner.load("default", device="cpu", dtype=asked)
    return _REAL_RUNNERS[dtype]


@pytest.fixture(scope="session")
def real_runner() -> ModelRunner:
    return load_real_runner("bf16")


@pytest.fixture(scope="session", params=["default", "bf16", "fp32"])
def dtype_runner(request) -> ModelRunner:
    return load_real_runner(request.param)
