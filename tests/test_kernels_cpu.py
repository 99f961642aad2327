"""The native CPU kernels (`cpu_kernels`, C built on first use) against their torch references,
and the fallback where they cannot be had. The int4 matmul is held to the dequantised fp32
reference in test_model_quant.py."""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from pie_trio.kernels import cpu_kernels
from pie_trio.kernels import torch_ops as ops
from pie_trio.kernels.dispatch import (
    PagedContext,
    reference_paged_attention,
    reference_rotary_kv_write,
    select,
)
from pie_trio.model.quant import Q4Weight, pack_q4

CPU = torch.device("cpu")

needs_native = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the native CPU kernels are unavailable here"
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@needs_native
def test_the_cpu_selects_them_where_they_build():
    kernels = select(CPU)
    assert kernels.native_cpu and not kernels.cuda
    assert kernels.native_attention(torch.zeros(1, 2, 8), 1)
    assert not kernels.native_attention(torch.zeros(1, 2, 8, dtype=torch.bfloat16), 1)
    assert not kernels.native_attention(torch.zeros(1, 2, 8), cpu_kernels.ATTENTION_MAX_QUERIES + 1)


@needs_native
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(with_delta):
    hidden, delta, weight = randn(5, 96, seed=1) * 3, randn(5, 96, seed=2), randn(96, seed=3)
    total, normed = cpu_kernels.add_rms_norm(hidden, delta if with_delta else None, weight, 1e-5)
    expected = hidden + delta if with_delta else hidden
    assert torch.allclose(total, expected)
    assert torch.allclose(normed, ops.rms_norm(expected, weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.equal(hidden, randn(5, 96, seed=1) * 3)  # the input is left alone


@needs_native
@pytest.mark.parametrize("ffn", [80, 83])  # eight lanes at a time, and a scalar tail
def test_silu_mul_matches_torch(ffn):
    gate_up = randn(3, 2 * ffn, seed=11) * 4
    # the vector exp clamps its input to [-87, 88]: far-out gates still give silu's limits
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -87.5, -20.0, 0.0, 20.0, 90.0, 200.0])
    assert torch.allclose(cpu_kernels.silu_mul(gate_up), ops.silu_mul(gate_up), rtol=1e-6,
                          atol=1e-6)


@pytest.fixture
def four_threads():
    """Ask the kernels for more parts than this machine may have cores: the pool still runs
    each part once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(threads)


@needs_native
def test_kernels_called_from_many_threads_at_once_are_exact(four_threads):
    """One caller holds the worker pool at a time; the others run their jobs alone. Every
    result is the one a lone call gives, bit for bit."""
    layer = pack_q4(Q4Weight.quantize(randn(300, 256, seed=12)))
    assert layer.native is not None
    inputs = [randn(5, 256, seed=20 + i) for i in range(6)]
    expected = [cpu_kernels.q4_matmul(x, layer.native, None) for x in inputs]

    def repeat(i: int) -> bool:
        return all(torch.equal(cpu_kernels.q4_matmul(inputs[i], layer.native, None),
                               expected[i]) for _ in range(40))

    with concurrent.futures.ThreadPoolExecutor(len(inputs)) as threads:
        assert all(threads.map(repeat, range(len(inputs))))


@pytest.fixture
def both_int4_paths():
    """Yields whether this CPU has the AVX-512 VNNI path; the choice is restored after."""
    chosen = cpu_kernels.vnni()
    has_vnni = cpu_kernels.use_vnni(True)
    yield has_vnni
    cpu_kernels.use_vnni(chosen)


@needs_native
@pytest.mark.parametrize("inputs", [256, 288, 576, 1536, 64])  # whole runs of 8 blocks, tails
def test_the_vnni_path_gives_the_avx2_results_bit_for_bit(both_int4_paths, inputs):
    if not both_int4_paths:
        pytest.skip("this CPU has no AVX-512 VNNI")
    rounded = Q4Weight.quantize(randn(67, inputs, seed=15))
    # scales as GGUF stores them (fp16), which the kernel keeps: the reference is then exact
    weight = Q4Weight(rounded.q, rounded.scale.half().float(), rounded.offset.half().float())
    layer = pack_q4(weight)
    assert layer.native is not None
    bias = randn(67, seed=16)
    for rows in (1, 3, 4, 7, 8, 9, 12, 16, 17):
        x = randn(rows, inputs, seed=rows) * 4
        cpu_kernels.use_vnni(True)
        vnni = cpu_kernels.q4_matmul(x, layer.native, bias)
        cpu_kernels.use_vnni(False)
        avx2 = cpu_kernels.q4_matmul(x, layer.native, bias)
        assert torch.equal(vnni, avx2), (inputs, rows)
        expected = x @ weight.dequantize().T + bias
        assert (vnni - expected).abs().max() <= 1e-3 * expected.abs().max(), (inputs, rows)


@needs_native
def test_forced_avx2_dispatch_keeps_the_avx2_int4_path():
    """`ATEN_CPU_CAPABILITY=avx2` (the suite's AVX2 rerun) holds the int4 kernel to AVX2 too."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    code = "from pie_trio.kernels import cpu_kernels; print(cpu_kernels.vnni())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False"]


def _matmul_in_child(layer: cpu_kernels.NativeQ4, x: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(4)
    return cpu_kernels.q4_matmul(x, layer, None)


@needs_native
def test_a_forked_child_runs_kernels_with_workers_of_its_own(four_threads):
    """Worker threads do not survive fork(): the child starts its own instead of waiting on
    the parent's."""
    layer = pack_q4(Q4Weight.quantize(randn(300, 256, seed=13)))
    assert layer.native is not None
    x = randn(3, 256, seed=14)
    expected = cpu_kernels.q4_matmul(x, layer.native, None)  # the parent's workers now run
    with multiprocessing.get_context("fork").Pool(1) as child:  # leaving it kills the child
        result = child.apply_async(_matmul_in_child, (layer.native, x)).get(timeout=60)
    assert torch.equal(result, expected)


@needs_native
def test_rotary_kv_write_matches_the_reference():
    heads, kv_heads, head_dim, rows = 4, 2, 16, 5
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, seed=4)
    cos, sin = ops.rotary_tables(1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim)), 64,
                                 torch.float32)
    positions = torch.tensor([0, 7, 8, 30, 63])
    slots = torch.tensor([3, -1, 9, 0, 20])  # one row's keys are not stored
    caches = [torch.zeros(kv_heads, 24, head_dim) for _ in range(4)]
    ours = cpu_kernels.rotary_kv_write(qkv, cos, sin, positions, slots, caches[0], caches[1],
                                       heads, kv_heads)
    theirs = reference_rotary_kv_write(qkv, cos, sin, positions, slots, caches[2], caches[3],
                                       heads, kv_heads)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(caches[0], caches[2], atol=1e-5)
    assert torch.equal(caches[1], caches[3])  # values are copied as they are
    assert not caches[0][:, 1].any()  # slot 1 was nobody's


def attention_case(batch: int, queries: int, length: int, seed: int, head_dim: int = 16):
    heads, kv_heads = 6, 2
    k_cache, v_cache = randn(kv_heads, 80, head_dim, seed=seed), randn(kv_heads, 80, head_dim,
                                                                        seed=seed + 1)
    q = randn(batch * queries, heads, head_dim, seed=seed + 2)
    return q, k_cache, v_cache


@needs_native
@pytest.mark.parametrize("layout", ["pages", "slots", "span"])
@pytest.mark.parametrize("masking", ["causal", "mask", "none"])
def test_paged_attention_matches_the_reference(layout, masking):
    batch, queries = (1, 3) if layout == "span" else (3, 2)
    q, k_cache, v_cache = attention_case(batch, queries, 12, seed=5)
    if layout == "pages":  # 4-slot pages, lengths 11, 6 and 12
        context = PagedContext(torch.tensor([[3, 1, 7], [2, 5, 0], [9, 4, 6]]), 4, 0,
                               torch.tensor([11, 6, 12], dtype=torch.int32), 12)
    elif layout == "slots":
        slots = torch.randperm(80, generator=torch.Generator().manual_seed(6))[: batch * 12]
        context = PagedContext.from_slots(slots.view(batch, 12), None)
    else:
        context = PagedContext.from_slots(None, (30, 42))
    mask = None
    if masking == "mask":
        mask = randn(batch, queries, 12, seed=7) > 0
        mask[0, 0] = False  # a row with nothing to attend: zeros
    causal = masking == "causal"
    ours = cpu_kernels.paged_attention(
        q, k_cache, v_cache, context.table, context.page_size, context.span_start,
        context.lengths, context.length, mask, batch, queries, causal, 0.25,
    )  # fmt: skip
    theirs = reference_paged_attention(q, k_cache, v_cache, context, batch, queries, mask,
                                       causal, 0.25)
    assert torch.allclose(ours, theirs, atol=1e-5)
    if mask is not None:
        assert not ours[0].any()


@needs_native
@pytest.mark.parametrize("head_dim", [8, 64, 75, 128])  # value sums: 64 wide, 8, and 1 at a time
def test_paged_attention_head_sizes(head_dim):
    q, k_cache, v_cache = attention_case(2, 1, 37, seed=9, head_dim=head_dim)
    slots = torch.randperm(80, generator=torch.Generator().manual_seed(10))[:74]
    context = PagedContext.from_slots(slots.view(2, 37), None)
    scale = head_dim**-0.5
    ours = cpu_kernels.paged_attention(q, k_cache, v_cache, context.table, context.page_size,
                                       context.span_start, context.lengths, context.length, None,
                                       2, 1, True, scale)
    theirs = reference_paged_attention(q, k_cache, v_cache, context, 2, 1, None, True, scale)
    assert torch.allclose(ours, theirs, atol=1e-5)


@needs_native
def test_paged_attention_splits_long_contexts_over_threads():
    """Enough work to take the parallel branch; the answer does not depend on it."""
    q, k_cache, v_cache = attention_case(1, 4, 80, seed=8)
    context = PagedContext.from_slots(None, (0, 80))
    ours = cpu_kernels.paged_attention(q.repeat(16, 1, 1), k_cache, v_cache, None, 1, 0, None,
                                       80, None, 16, 4, True, 0.25)
    theirs = reference_paged_attention(q.repeat(16, 1, 1), k_cache, v_cache, context, 16, 4,
                                       None, True, 0.25)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_switched_off_they_leave_torch_to_run(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
            assert cpu_kernels.library() is None
        assert f"{cpu_kernels.ENV_SWITCH}=0" in caplog.text
        assert not select(CPU).native_cpu
        layer = pack_q4(Q4Weight.quantize(randn(64, 64, seed=9)))
        assert layer.native is None and layer.packed is not None
    finally:
        cpu_kernels.library.cache_clear()


@pytest.mark.skipif(cpu_kernels._unavailable() is not None, reason="no compiler or AVX2 here")
def test_a_failed_build_is_a_warning_and_torch_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: it must build
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [broken])
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert cpu_kernels.library() is None
        assert "could not build" in caplog.text
        assert pack_q4(Q4Weight.quantize(randn(64, 64, seed=10))).native is None
    finally:
        cpu_kernels.library.cache_clear()
