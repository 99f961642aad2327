"""Shared fixtures: a tiny random-weight model for fast tests, the real default model for
correctness tests.

- `tiny_runner`: a fresh `ModelRunner` (its own KV pool) on the tiny model, fp32, 64 pages of 16
  slots. Call `pie_trio.model.tiny.tiny_runner(...)` directly for other sizes.
- `real_runner`: SmolLM2-135M-Instruct as `pie-trio serve` runs it (bf16, CPU), loaded once per
  test session and shared: tests must free what they allocate and not rely on pool contents.
"""

from __future__ import annotations

import pytest
import torch

from pie_trio.model import ModelRunner
from pie_trio.model.tiny import tiny_runner as make_tiny_runner


@pytest.fixture
def tiny_runner() -> ModelRunner:
    return make_tiny_runner()


@pytest.fixture(scope="session")
def real_runner() -> ModelRunner:
    return ModelRunner.load("default", device="cpu", dtype=torch.bfloat16)
