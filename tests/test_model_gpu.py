"""The same forward on CUDA as on CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from pie_trio.model.calls import Forward, MaskKv, Sampler
from pie_trio.model.tiny import tiny_runner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def batch(prompt: list[int]) -> list[Forward]:
    """A prefill, a masked prefill and a decode-sized block, on scattered pages."""
    n = len(prompt)
    masks = [[i + 1] if i < 3 else [2, 1, i - 2] for i in range(n)]
    return [
        Forward(
            owner="g",
            kv_pages=[5, 2],
            last_page_len=n - 16,
            positions=list(range(n)),
            tokens=prompt,
            output_indices=[n - 1],
            sampler=Sampler(),
            top_k=3,
        ),
        Forward(
            owner="g",
            kv_pages=[7, 1],
            last_page_len=n - 16,
            positions=list(range(n)),
            tokens=prompt,
            masks=masks,
            output_indices=[n - 1],
        ),
        Forward(
            owner="g",
            kv_pages=[9],
            last_page_len=3,
            positions=[0, 1, 2],
            tokens=prompt[:3],
            output_indices=[0, 1, 2],
        ),
    ]


def test_cuda_forward_matches_cpu():
    prompt = list(range(1000, 1020))
    cpu, gpu = tiny_runner(), tiny_runner(device="cuda")
    for runner in (cpu, gpu):
        runner.mask_kv([MaskKv(owner="g", page=3, slots=[1])])
    expected = cpu.logits(batch(prompt))
    got = gpu.logits(batch(prompt)).cpu()
    # fp32 on both sides; CUDA kernels only order their reductions differently.
    assert torch.allclose(got, expected, atol=1e-3)
    assert gpu.forward(batch(prompt))[0].tokens == cpu.forward(batch(prompt))[0].tokens
