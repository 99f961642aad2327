"""Every raw CUDA kernel against its torch reference, on random and edge-case shapes (empty
batches, one token, page boundaries, fully masked rows), and a captured decode graph against the
ordinary forward. Skipped without a CUDA device and CuPy (`scripts/gpu_check.sh` runs it)."""

from __future__ import annotations

import pytest
import torch

from pie_trio.kernels import cuda_kernels
from pie_trio.kernels import torch_ops as ops
from pie_trio.kernels.dispatch import (
    PagedContext,
    SamplingRows,
    reference_paged_attention,
    reference_rotary_kv_write,
    select,
)
from pie_trio.model.calls import Forward
from pie_trio.model.cuda_graphs import DecodeGraphs, TorchGraphBackend
from pie_trio.model.sampling import shape_logits
from pie_trio.model.tiny import tiny_runner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        cuda_kernels.unavailable_reason() is not None,
        reason=f"raw kernels unavailable: {cuda_kernels.unavailable_reason()}",
    ),
]
CUDA = torch.device("cuda")
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}
SHAPES = [(4, 2, 16), (9, 3, 64), (32, 8, 128), (8, 8, 64)]  # heads, kv_heads, head_dim


@pytest.fixture(scope="module")
def kernels():  # type: ignore[no-untyped-def]
    chosen = select(CUDA, enabled=True)
    assert chosen.cuda, chosen.reason
    return chosen


def random_pages(batch: int, pages: int, pool_pages: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(pool_pages, generator=g)[: batch * pages].view(batch, pages).to(CUDA)


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == expected.shape
    error = (got.float() - expected.float()).abs().max().item() if got.numel() else 0.0
    assert error <= TOLERANCE[dtype], f"max error {error}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("batch,queries", [(0, 1), (1, 1), (3, 1), (33, 1), (5, 4), (2, 8)])
def test_paged_decode_attention(kernels, dtype, heads, kv_heads, head_dim, batch, queries):  # type: ignore[no-untyped-def]
    page_size, pages = 16, 5
    k_cache = torch.randn(kv_heads, 64 * page_size, head_dim, device=CUDA, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = random_pages(batch, pages, 64, batch + queries)
    # Lengths around page boundaries, one sequence with no key at all.
    lengths = torch.tensor([[15, 16, 17, 80, 1, 0][i % 6] for i in range(batch)],
                           dtype=torch.int32, device=CUDA)  # fmt: skip
    context = PagedContext(table, page_size, 0, lengths, pages * page_size)
    q = torch.randn(batch * queries, heads, head_dim, device=CUDA, dtype=dtype)
    for causal in (False, True):
        got = kernels.paged_attention(q, k_cache, v_cache, context, batch, queries, None,
                                      causal, 0.125)  # fmt: skip
        expected = reference_paged_attention(q, k_cache, v_cache, context, batch, queries, None,
                                             causal, 0.125)  # fmt: skip
        close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_and_fully_masked_rows(kernels, dtype):  # type: ignore[no-untyped-def]
    batch, queries, length = 4, 3, 70
    k_cache = torch.randn(2, 512, 16, device=CUDA, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(512, device=CUDA)[: batch * length].view(batch, length)
    mask = torch.rand(batch, queries, length, device=CUDA) < 0.3
    mask[1, 2] = False  # a row with nothing to attend
    mask[2] = False
    q = torch.randn(batch * queries, 4, 16, device=CUDA, dtype=dtype)
    context = PagedContext.from_slots(slots, None)
    got = kernels.paged_attention(q, k_cache, v_cache, context, batch, queries, mask, False, 0.25)
    expected = reference_paged_attention(q, k_cache, v_cache, context, batch, queries, mask,
                                         False, 0.25)  # fmt: skip
    close(got, expected, dtype)
    per_query = got.view(batch, queries, -1)
    assert not per_query[2].any() and not per_query[1, 2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries,length,custom", [(300, 300, False), (100, 260, False),
                                                   (64, 64, True), (1, 1, False)])
def test_prefill_attention(kernels, dtype, queries, length, custom):  # type: ignore[no-untyped-def]
    heads, kv_heads, d = 9, 3, 64
    k_cache = torch.randn(kv_heads, 1024, d, device=CUDA, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(queries, heads, d, device=CUDA, dtype=dtype)
    # A strided query view, as the model slices it out of the fused projection.
    q = torch.cat([q, q], dim=1)[:, :heads]
    slots = torch.randperm(1024, device=CUDA)[:length].view(1, length)
    mask = None
    if custom:
        mask = (torch.rand(1, queries, length, device=CUDA) < 0.5).tril_()
        mask[:, :, 0] = True
    context = PagedContext.from_slots(slots, None)
    causal = mask is None
    got = kernels.paged_attention(q, k_cache, v_cache, context, 1, queries, mask, causal, 0.125)
    k, v = k_cache[:, slots[0]], v_cache[:, slots[0]]
    if mask is None and queries < length:
        keys = torch.arange(length, device=CUDA)
        mask = (keys.view(1, -1) <= torch.arange(length - queries, length, device=CUDA).view(-1, 1))
        expected = ops.prefill_attention(q, k, v, mask, False, 0.125)
    else:
        expected = ops.prefill_attention(q, k, v, None if mask is None else mask[0], causal, 0.125)
    close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,width", [(0, 64), (1, 576), (37, 4096), (5, 100)])
def test_add_rms_norm(kernels, dtype, rows, width):  # type: ignore[no-untyped-def]
    hidden = torch.randn(rows, width, device=CUDA, dtype=dtype)
    delta = torch.randn_like(hidden)
    weight = torch.randn(width, device=CUDA, dtype=dtype)
    total, normed = kernels.add_rms_norm(hidden, delta, weight, 1e-5)
    close(total, hidden + delta, dtype)
    close(normed, ops.rms_norm(hidden + delta, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 19])
def test_rotary_kv_write(kernels, dtype, rows):  # type: ignore[no-untyped-def]
    heads, kv_heads, d = 9, 3, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, device=CUDA, dtype=dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device=CUDA) / d)
    cos, sin = ops.rotary_tables(inv_freq, 2048, dtype)
    positions = torch.randint(0, 2048, (rows,), device=CUDA)
    slots = torch.randperm(256, device=CUDA)[:rows]
    if rows > 2:
        slots[1] = -1
    caches = [torch.zeros(kv_heads, 256, d, device=CUDA, dtype=dtype) for _ in range(4)]
    got = kernels.rotary_kv_write(qkv, cos, sin, positions, slots, caches[0], caches[1], heads, 3)
    expected = reference_rotary_kv_write(qkv, cos, sin, positions, slots, caches[2], caches[3],
                                         heads, kv_heads)  # fmt: skip
    close(got, expected, dtype)
    close(caches[0], caches[2], dtype)
    assert torch.equal(caches[1], caches[3])


def allowed_support(logits: torch.Tensor, t: float, top_k: int, top_p: float, min_p: float):  # type: ignore[no-untyped-def]
    """Bool `[rows, vocab]`: tokens the reference sampler can draw (sampling.sample's filters)."""
    z = logits / t
    if 0 < top_k < z.shape[-1]:
        z = z.masked_fill(z < torch.topk(z, top_k, dim=-1).values[:, -1:], float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        kept = sorted_probs.masked_fill(before >= top_p, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, kept)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0)
    return probs > 0


@pytest.mark.parametrize("vocab", [8, 1000, 49152])
def test_sampling_kernel(kernels, vocab):  # type: ignore[no-untyped-def]
    g = torch.Generator(device=CUDA).manual_seed(0)
    logits = torch.randn(6, vocab, device=CUDA, generator=g) * 3
    mask = bytes([0b10110101]) * ((vocab + 7) // 8)
    settings = [(0.0, 0, 1.0, 0.0), (0.8, 5, 1.0, 0.0), (1.0, 0, 0.9, 0.0),
                (1.3, 50, 0.8, 0.05), (1.0, 0, 1.0, 0.2), (0.7, 0, 1.0, 0.0)]  # fmt: skip
    rows = SamplingRows()
    calls = []
    for i, (t, k, p, m) in enumerate(settings):
        call_mask = mask if i in (1, 3) else None
        bias = {3: 4.0, 4: -2.0} if i in (2, 3) else None
        rows.add(1, t, k, p, m, seed=i if i % 2 else None, vocab_mask=call_mask, logit_bias=bias)
        calls.append(Forward(owner="t", kv_pages=[0], last_page_len=1, positions=[0],
                             tokens=[0], vocab_mask=call_mask, logit_bias=bias))  # fmt: skip
    shaped = logits.clone()
    for i, call in enumerate(calls):
        shape_logits(shaped[i : i + 1], call)
    got_logits = logits.clone()
    tokens = kernels.sample_rows(got_logits, rows, g)
    assert torch.equal(got_logits, shaped)  # shaped in place, as the reference does
    assert tokens[0].item() == shaped[0].argmax().item()
    for i, (t, k, p, m) in enumerate(settings[1:], start=1):
        support = allowed_support(shaped[i : i + 1], t, k, p, m)[0]
        assert support[tokens[i]].item(), f"row {i} drew a token the reference cannot"
    again = kernels.sample_rows(logits.clone(), rows, torch.Generator(device=CUDA).manual_seed(0))
    assert torch.equal(tokens[1::2], again[1::2])  # seeded rows repeat


def test_sampling_distribution(kernels):  # type: ignore[no-untyped-def]
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]], device=CUDA)
    draws = 20000
    rows = SamplingRows()
    for seed in range(draws):
        rows.add(1, temperature=0.9, top_p=0.95, seed=seed)
    tokens = kernels.sample_rows(logits.expand(draws, -1).contiguous(), rows, torch.Generator())
    counts = torch.bincount(tokens, minlength=8).float() / draws
    probs = torch.softmax(logits[0] / 0.9, dim=-1)
    kept = allowed_support(logits, 0.9, 0, 0.95, 0.0)[0]
    expected = torch.where(kept, probs, 0) / probs[kept].sum()
    assert (counts - expected).abs().max().item() < 0.015


def test_sampling_empty_batch(kernels):  # type: ignore[no-untyped-def]
    tokens = kernels.sample_rows(torch.zeros(0, 10, device=CUDA), SamplingRows(), torch.Generator())
    assert tokens.shape == (0,)


def test_graph_decode_matches_the_ordinary_forward(kernels):  # type: ignore[no-untyped-def]
    eager, graphed = tiny_runner(device="cuda"), tiny_runner(device="cuda")
    graphs = DecodeGraphs(graphed.model, graphed.kv, kernels, TorchGraphBackend(), max_context=256)
    prompts = [list(range(100 + i, 120 + 3 * i)) for i in range(5)]
    calls = []
    for runner in (eager, graphed):
        calls = [Forward(owner="t", kv_pages=[2 * i + 1, 2 * i + 2], last_page_len=len(p) - 16,
                         positions=list(range(len(p))), tokens=p, output_indices=[len(p) - 1])
                 for i, p in enumerate(prompts)]  # fmt: skip
        runner.logits(calls)
    for step in range(4):
        calls = [Forward(owner="t", kv_pages=c.kv_pages, last_page_len=c.last_page_len + 1,
                         positions=[c.positions[-1] + 1], tokens=[7 + step], output_indices=[0])
                 for c in calls]  # fmt: skip
        expected = eager.logits(calls)
        got = graphs.logits(calls)
        assert got is not None
        assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    assert list(graphs.graphs) == [8] and graphs.replays == 4
