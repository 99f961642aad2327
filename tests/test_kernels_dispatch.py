"""CPU checks of the kernel dispatch: which implementation runs where, the torch references the
CUDA kernels are held to, the sampling rows' packing and the CUDA-graph bookkeeping (with a
backend that replays eagerly, so no GPU is needed)."""

from __future__ import annotations

import pytest
import torch

from pie_trio.kernels import cuda_kernels
from pie_trio.kernels import torch_ops as ops
from pie_trio.kernels.dispatch import (
    Kernels,
    PagedContext,
    SamplingRows,
    reference_paged_attention,
    reference_rotary_kv_write,
    select,
)
from pie_trio.model.calls import Forward
from pie_trio.model.cuda_graphs import DecodeGraphs, EagerBackend, padded_size
from pie_trio.model.tiny import tiny_runner

CPU = torch.device("cpu")


def test_cpu_runs_the_torch_references():
    kernels = select(CPU)
    assert not kernels.cuda and "cpu" in kernels.reason
    assert not select(torch.device("cuda"), enabled=False).cuda
    with pytest.raises(cuda_kernels.KernelError):
        kernels.sample_rows(torch.zeros(1, 4), SamplingRows(), torch.Generator())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_device_says_why():
    kernels = select(torch.device("cuda"), enabled=True)
    assert not kernels.cuda and kernels.reason


def pool(kv_heads: int = 2, slots: int = 64, head_dim: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(kv_heads, slots, head_dim, generator=g) for _ in range(2))


def test_paged_attention_reference_matches_gather_and_decode():
    k_cache, v_cache = pool()
    pages = torch.tensor([[3, 1, 7], [2, 5, 0]])  # 4-slot pages, second sequence 6 keys
    lengths = torch.tensor([11, 6], dtype=torch.int32)
    q = torch.randn(2 * 2, 4, 8)
    context = PagedContext(pages, 4, 0, lengths, 12)
    got = reference_paged_attention(q, k_cache, v_cache, context, 2, 2, None, True, 0.3)

    slots = (pages.unsqueeze(-1) * 4 + torch.arange(4)).view(2, 12)
    k, v = ops.gather_kv(k_cache, slots), ops.gather_kv(v_cache, slots)
    keys = torch.arange(12)
    last = lengths.long().view(2, 1, 1) - 2 + torch.arange(2).view(1, 2, 1)
    mask = keys.view(1, 1, 12) <= last
    expected = ops.decode_attention(q.view(2, 2, 4, 8), k, v, mask, 0.3).reshape(4, 4, 8)
    assert torch.allclose(got, expected, atol=1e-6)


def test_slot_table_page_table_and_span_agree():
    k_cache, v_cache = pool()
    q = torch.randn(5, 4, 8)
    as_pages = PagedContext(torch.tensor([[4, 5]]), 8, 0, None, 13)
    as_slots = PagedContext.from_slots(torch.arange(32, 45).view(1, 13), None)
    as_span = PagedContext.from_slots(None, (32, 45))
    outs = [reference_paged_attention(q, k_cache, v_cache, c, 1, 5, None, True, 0.5)
            for c in (as_pages, as_slots, as_span)]  # fmt: skip
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])
    # A causal block that is its whole context is the prefill reference.
    whole = PagedContext.from_slots(None, (32, 37))
    got = reference_paged_attention(q, k_cache, v_cache, whole, 1, 5, None, True, 0.5)
    prefill = ops.prefill_attention(q, k_cache[:, 32:37], v_cache[:, 32:37], None, True, 0.5)
    assert torch.allclose(got, prefill, atol=1e-6)


def test_fully_masked_rows_and_empty_batches_are_zeros():
    k_cache, v_cache = pool()
    q = torch.randn(2, 4, 8)
    context = PagedContext(torch.tensor([[0], [1]]), 16, 0, torch.tensor([0, 16]), 16)
    mask = torch.ones(2, 1, 16, dtype=torch.bool)
    mask[1] = False
    out = reference_paged_attention(q, k_cache, v_cache, context, 2, 1, mask, False, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    empty = reference_paged_attention(q[:0], k_cache, v_cache, context, 0, 1, None, False, 1.0)
    assert empty.shape == (0, 4, 8)


def test_rotary_kv_write_reference_skips_negative_slots():
    heads, kv_heads, d = 4, 2, 8
    qkv = torch.randn(3, (heads + 2 * kv_heads) * d)
    cos, sin = ops.rotary_tables(1.0 / 10000 ** (torch.arange(0, d, 2) / d), 32, torch.float32)
    positions, slots = torch.tensor([0, 5, 9]), torch.tensor([7, -1, 2])
    k_cache, v_cache = torch.zeros(kv_heads, 16, d), torch.zeros(kv_heads, 16, d)
    q = reference_rotary_kv_write(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, 2)
    qk = ops.apply_rotary(qkv[:, : 6 * d].view(3, 6, d), cos[positions], sin[positions])
    assert torch.equal(q, qk[:, :heads])
    assert torch.equal(k_cache[:, 7], qk[0, heads:]) and torch.equal(k_cache[:, 2], qk[2, heads:])
    assert torch.equal(v_cache[:, 2], qkv[2, 6 * d :].view(kv_heads, d))
    written = torch.zeros(16, dtype=torch.bool)
    written[[7, 2]] = True
    assert not k_cache[:, ~written].any() and not v_cache[:, ~written].any()


def test_add_rms_norm_reference():
    hidden, delta, weight = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    total, normed = Kernels(False).add_rms_norm(hidden, delta, weight, 1e-5)  # no native ones
    assert torch.equal(total, hidden + delta)
    assert torch.equal(normed, ops.rms_norm(hidden + delta, weight, 1e-5))


def test_sampling_rows_pack_per_call_parameters():
    rows = SamplingRows()
    rows.add(2, temperature=0.7, top_k=5, seed=3, vocab_mask=b"\x05", logit_bias={1: 2.0})
    rows.add(1)
    rows.add(1, temperature=1.0, vocab_mask=b"\xff")
    temperature, top_k, _, _, seeds, masks, index, offsets, ids, values = rows.tensors(
        CPU, 12, torch.Generator().manual_seed(1)
    )
    assert len(rows) == 4 and temperature.tolist() == pytest.approx([0.7, 0.7, 0.0, 1.0])
    assert top_k.tolist() == [5, 5, 0, 0] and index is not None and masks is not None
    assert index.tolist() == [0, 0, -1, 1] and masks.tolist() == [[5, 0], [255, 0]]
    assert offsets is not None and offsets.tolist() == [0, 1, 2, 2, 2]
    assert ids is not None and values is not None
    assert ids.tolist() == [1, 1] and values.tolist() == [2.0, 2.0]
    again = rows.tensors(CPU, 12, torch.Generator().manual_seed(1))[4]
    other = rows.tensors(CPU, 12, torch.Generator().manual_seed(2))[4]
    assert torch.equal(seeds, again) and seeds[0] != seeds[1]
    assert torch.equal(seeds[:2], other[:2]) and not torch.equal(seeds[2:], other[2:])


def test_attention_launch_shapes():
    assert cuda_kernels.attention_fits(9, 3, 64) and cuda_kernels.attention_fits(64, 8, 128)
    assert not cuda_kernels.attention_fits(128, 1, 128)
    assert cuda_kernels.attention_query_tile(1, 32, 9, 3, 64, 132) == 1
    tile = cuda_kernels.attention_query_tile(4096, 1, 32, 8, 128, 132)
    assert 1 <= tile and 4 * tile * 128 <= cuda_kernels.ATTENTION_MAX_CELLS
    worst = cuda_kernels.attention_shared_bytes(cuda_kernels.ATTENTION_MAX_CELLS // 16, 16)
    assert worst <= 227 * 1024  # an H100/H200 block's most dynamic shared memory


# -- CUDA graph bookkeeping ---------------------------------------------------------------------


def test_padded_sizes():
    assert [padded_size(n) for n in (1, 3, 8, 9, 100, 128)] == [1, 4, 8, 16, 128, 128]
    assert padded_size(0) is None and padded_size(129) is None


def prefill(runner, prompts):  # type: ignore[no-untyped-def]
    calls = [
        Forward(owner="t", kv_pages=[2 * i + 1, 2 * i + 2], last_page_len=len(p) - 16,
                positions=list(range(len(p))), tokens=p, output_indices=[len(p) - 1])
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    runner.logits(calls)
    return calls


def decode(calls: list[Forward], tokens: list[int]) -> list[Forward]:
    return [
        Forward(owner="t", kv_pages=c.kv_pages, last_page_len=c.last_page_len + 1,
                positions=[c.positions[-1] + 1], tokens=[t], output_indices=[0])
        for c, t in zip(calls, tokens, strict=True)
    ]  # fmt: skip


def test_graph_decode_matches_the_ordinary_forward():
    prompts = [list(range(100 + i, 120 + 3 * i)) for i in range(3)]
    eager, graphed = tiny_runner(), tiny_runner()
    backend = EagerBackend()
    graphs = DecodeGraphs(graphed.model, graphed.kv, select(CPU), backend, max_context=64)
    calls = [prefill(r, prompts) for r in (eager, graphed)][0]
    for step in range(3):
        step_calls = decode(calls, [7 + step, 8 + step, 9 + step])
        expected = eager.logits(step_calls)
        got = graphs.logits(step_calls)
        assert got is not None and got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4)
        calls = step_calls
    assert backend.captures == 1 and graphs.replays == 3 and list(graphs.graphs) == [4]
    assert torch.allclose(graphed.kv.k, eager.kv.k, atol=1e-5)  # same K/V written, no stray rows


def test_graphs_fall_back_when_the_shape_does_not_fit():
    runner = tiny_runner()
    graphs = DecodeGraphs(runner.model, runner.kv, select(CPU), EagerBackend(), max_context=32)
    calls = prefill(runner, [list(range(200, 220))])
    step = decode(calls, [5])
    assert graphs.logits([]) is None
    assert graphs.logits([Forward(**{**vars(step[0]), "tokens": [5, 6], "positions": [20, 21],
                                      "output_indices": [1]})]) is None  # fmt: skip
    assert graphs.logits([Forward(**{**vars(step[0]), "masks": [[21]]})]) is None
    long_call = Forward(**{**vars(step[0]), "kv_pages": [1, 2, 3]})
    assert graphs.logits([long_call]) is None  # more pages than the captured table holds
    runner.kv.set_masked(9, [0], True)
    assert graphs.logits(step) is None and not graphs.graphs
    assert DecodeGraphs.for_device(runner.model, runner.kv, select(CPU)) is None
