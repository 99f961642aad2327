"""Int4 weights: GGUF Q4_0/Q4_1 blocks kept packed and run through the native int4 kernel
(`cpu_kernels`) where it builds, torch's int4 CPU kernel elsewhere; both are tested here.

The reference is always the same GGUF dequantised to fp32 (what `--weights fp32` runs). Neither
kernel is exact. torch's takes bf16 activations and bf16 scales and returns bf16, so a
projection's output moves by ~3e-3 of its size (measured: 2.8-3.1e-3 relative on random data),
about what bf16 dense weights do. The native one keeps the fp32 scales and rounds activations
to two int8 digits per block of 32 (about 16 bits): ~6e-5 of the output's size. The 4-bit values
themselves are never re-rounded.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from conftest import load_real_runner

from pie_trio.kernels import cpu_kernels
from pie_trio.kernels import torch_ops as ops
from pie_trio.model.calls import Forward
from pie_trio.model.generate import generate
from pie_trio.model.hardware import choose_weights, cpu_info, dtype_for_weights
from pie_trio.model.quant import (
    Q4Weight,
    from_gguf_blocks,
    pack_panels,
    pack_q4,
    pack_q8_panels_exactly,
)

CPU = torch.device("cpu")
# One projection: bf16 rounding of the input, the scales and the output, each ~2^-9 relative.
LINEAR_RTOL = 1e-2


def gguf_q4(type_name: str, out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random weights quantised by gguf itself: (raw blocks, gguf's own dequantisation)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    weights = np.random.default_rng(seed).normal(0, 0.05, (out, inp)).astype(np.float32)
    raw = quantize(weights, GGMLQuantizationType[type_name])
    return raw, dequantize(raw, GGMLQuantizationType[type_name])


# Which int4 kernel a test packs for: "native" is skipped where it cannot be built.
KERNELS = ["native", "torch"]


def kernel_of(name: str) -> bool:
    """pack_q4's `native` for a KERNELS entry."""
    if name == "native" and not cpu_kernels.available():
        pytest.skip("the native CPU kernels are unavailable here (see cpu_kernels.library)")
    return name == "native"


def int4_matmul(x: torch.Tensor, layer: ops.QuantLinear) -> torch.Tensor:
    """The kernel path of `layer` whatever the row count (no dense copy)."""
    return ops.linear(x, dataclasses.replace(layer, dense=None, panels=None))


def assert_close_relative(y: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
    """Every element within `rtol` of the largest reference value (outputs near zero have no
    meaningful relative error), and the whole within `rtol` in norm."""
    error = (y.float() - reference).abs()
    assert error.max().item() <= rtol * reference.abs().max().item()
    assert (error.norm() / reference.norm()).item() <= rtol


# -- blocks and the kernel on random data --------------------------------------------------------


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_blocks_dequantise_exactly_as_gguf(type_name):
    raw, reference = gguf_q4(type_name, 96, 256)
    weight = from_gguf_blocks(raw, type_name)
    assert weight.shape == (96, 256) and int(weight.q.max()) <= 15
    assert np.array_equal(weight.dequantize().numpy(), reference)  # bit for bit


def test_row_moves_commute_with_dequantisation():
    """Un-permuting rows and fusing projections act on whole rows with their scales."""
    a = from_gguf_blocks(gguf_q4("Q4_1", 64, 128, seed=1)[0], "Q4_1")
    b = from_gguf_blocks(gguf_q4("Q4_0", 32, 128, seed=2)[0], "Q4_0")
    order = torch.randperm(64)
    moved = a.map_rows(lambda rows: rows[order])
    assert torch.equal(moved.dequantize(), a.dequantize()[order])
    fused = Q4Weight.cat([a, b])
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


# The native kernel's error on fp32 input: two-digit activations, ~6e-5 of the output's size.
NATIVE_RTOL = 1e-3


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("inputs", [256, 576, 96])  # 8, 18 and 3 blocks: whole runs of 8, not
def test_int4_linear_matches_dequantised_fp32(type_name, rows, dtype, kernel, inputs):
    raw, reference = gguf_q4(type_name, 192, inputs, seed=rows)
    bias = torch.randn(192) * 0.1
    layer = pack_q4(from_gguf_blocks(raw, type_name), bias.to(dtype), native=kernel_of(kernel))
    assert (layer.native is not None) == (kernel == "native")
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(3))
    y = int4_matmul(x.to(dtype), layer)
    assert y.dtype == dtype and y.shape == (rows, 192)  # the model keeps its compute dtype
    expected = torch.nn.functional.linear(x, torch.from_numpy(np.array(reference)), bias)
    precise = kernel == "native" and dtype == torch.float32
    assert_close_relative(y, expected, NATIVE_RTOL if precise else LINEAR_RTOL)


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_batches_run_the_dense_copy(kernel):
    raw, reference = gguf_q4("Q4_1", 64, 128)
    dense = ops.pack_linear(torch.from_numpy(np.array(reference)))
    layer = pack_q4(from_gguf_blocks(raw, "Q4_1"), dense=dense, native=kernel_of(kernel))
    small = torch.randn(layer.max_rows, 128)
    large = torch.randn(layer.max_rows + 1, 128)
    assert torch.equal(ops.linear(large, layer), ops.linear(large, dense))
    assert not torch.equal(ops.linear(small, layer), ops.linear(small, dense))  # the kernel
    assert ops.linear(torch.zeros(0, 128), layer).shape == (0, 64)


def panels_layer(type_name: str, out: int, inputs: int, bias: torch.Tensor | None = None
                 ) -> tuple[ops.QuantLinear, torch.Tensor]:
    """A native int4 layer whose large batches run its panels, and its dequantised weights."""
    kernel_of("native")
    raw, reference = gguf_q4(type_name, out, inputs)
    weight = from_gguf_blocks(raw, type_name)
    panels = pack_panels(weight)
    assert panels is not None
    return pack_q4(weight, bias, panels=panels), torch.from_numpy(np.array(reference))


# The panels' error on fp32 input: the fp32 sums of the dequantised weights, in another order
# than oneDNN's (measured ~1e-6 of the output's size).
PANELS_RTOL = 1e-5


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("inputs", [96, 576])
def test_large_batches_run_the_panels_in_fp32(type_name, inputs):
    bias = torch.randn(48) * 0.1
    layer, reference = panels_layer(type_name, 48, inputs, bias)
    assert layer.dense is None  # the panels take the place of the dense copy
    gen = torch.Generator().manual_seed(1)
    for rows in [layer.max_rows + 1, 14, 15, 19, 20, 21, 32, 100]:  # every tile remainder
        x = torch.randn(rows, inputs, generator=gen)
        y = ops.linear(x, layer)
        expected = torch.nn.functional.linear(x.double(), reference.double(), bias.double())
        assert_close_relative(y, expected, PANELS_RTOL)
        # one sum per output, in input order: a row's result does not depend on its batch
        # (apart from the batch, the row would run the small-batch kernel)
        rest = torch.randn(layer.max_rows, inputs, generator=gen)
        again = ops.linear(torch.cat([rest, x[-1:]]), layer)
        assert torch.equal(again[-1], y[-1])
    small = torch.randn(layer.max_rows, inputs, generator=gen)
    assert not torch.equal(ops.linear(small, layer), ops.linear(small, ops.pack_linear(reference)))
    assert ops.linear(x.bfloat16(), layer).dtype == torch.bfloat16


def test_panels_hold_the_dequantised_weights_exactly():
    layer, reference = panels_layer("Q4_1", 64, 128)
    eye = torch.eye(128)  # each output a single weight times one, plus exact zeros
    assert torch.equal(ops.linear(eye, layer), reference.T)


def gguf_q8(out: int, inp: int) -> torch.Tensor:
    """Random weights quantised to Q8_0 by gguf, dequantised (as the loader does)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    weights = np.random.default_rng(7).normal(0, 0.05, (out, inp)).astype(np.float32)
    q8 = GGMLQuantizationType.Q8_0
    return torch.from_numpy(np.array(dequantize(quantize(weights, q8), q8), dtype=np.float32))


def test_a_dequantised_q8_head_runs_8_bit_panels_of_the_same_values():
    kernel_of("native")
    weight = gguf_q8(96, 128)
    panels = pack_q8_panels_exactly(weight)
    assert panels is not None and panels.bits == 8
    assert torch.equal(cpu_kernels.panel_matmul(torch.eye(128), panels, None), weight.T)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(2))
    expected = torch.nn.functional.linear(x.double(), weight.double())
    assert_close_relative(cpu_kernels.panel_matmul(x, panels, None), expected, PANELS_RTOL)
    # anything else keeps its dense form: not Q8_0 values, or not whole blocks of inputs
    assert pack_q8_panels_exactly(weight * 1.001) is None
    assert pack_q8_panels_exactly(torch.randn(96, 128)) is None
    assert pack_q8_panels_exactly(weight[:, :100].contiguous()) is None


def test_large_batches_run_the_heads_panels():
    kernel_of("native")
    weight = gguf_q8(4096, 256)
    gen = torch.Generator().manual_seed(3)
    approx = pack_q4(Q4Weight.quantize(weight))
    head = ops.pack_shortlist_head(weight, approx, panels=pack_q8_panels_exactly(weight))
    assert isinstance(head, ops.ShortlistHead) and head.panels is not None
    x = torch.randn(head.max_rows + 1, 256, generator=gen)
    assert torch.equal(ops.linear(x, head), cpu_kernels.panel_matmul(x, head.panels, None))
    assert_close_relative(ops.linear(x, head), ops.linear(x, head.exact), PANELS_RTOL)
    assert ops.linear(x[:0], head).shape == (0, 4096)


def test_panels_need_whole_panels_of_outputs():
    kernel_of("native")
    raw, _ = gguf_q4("Q4_1", 40, 64)
    assert pack_panels(from_gguf_blocks(raw, "Q4_1")) is None  # 40 outputs: not a multiple of 16


# -- the LM head in two stages ------------------------------------------------------------------


def peaked_head(vocab: int = 4096, hidden: int = 256, rows: int = 4, native: bool = True):
    """A random head and hidden states that point at a few of its rows: a clear top, as a
    trained model's logits have. `native`: the int4 copy for the native kernel (when it is
    available: the exact stage in C), else for torch's (the exact stage by oneDNN)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(vocab, hidden, generator=gen) * 0.05
    picked = torch.randint(vocab, (rows, 3), generator=gen)
    x = weight[picked].sum(1) * 40 + torch.randn(rows, hidden, generator=gen)
    approx = pack_q4(Q4Weight.quantize(weight), native=native)
    head = ops.pack_shortlist_head(weight, approx, candidates=32)
    assert isinstance(head, ops.ShortlistHead)
    head.max_rows = rows
    return head, x


def test_requantised_blocks_round_to_the_nearest_step():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    q4 = Q4Weight.quantize(weight)
    steps = q4.scale.repeat_interleave(32, dim=1)
    assert int(q4.q.max()) <= 15
    assert ((q4.dequantize() - weight).abs() <= steps / 2 + 1e-6).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_shortlist_is_the_exact_head_on_its_candidates(kernel):
    head, x = peaked_head(native=kernel_of(kernel))
    exact = ops.linear(x, head.exact)
    ours = ops.linear(x, head)
    approx = ops.linear(x, head.approx)
    # Strictly above the first value left out: in the shortlist whatever order ties take.
    shortlisted = approx > approx.topk(head.candidates + 1, dim=-1).values[:, -1:]
    assert shortlisted.sum() >= x.shape[0] * head.candidates // 2
    if kernel == "torch":  # oneDNN's own sums: bit for bit
        assert torch.equal(ours[shortlisted], exact[shortlisted])
    else:  # fp32 dot products in C: the same sums in another order
        assert torch.allclose(ours[shortlisted], exact[shortlisted], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    assert not torch.equal(ours, exact)  # the rest is the int4 copy's
    assert (ours - exact).abs().max().item() < 0.05 * exact.abs().max().item()


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_without_a_clear_top_run_the_exact_head(kernel):
    head, x = peaked_head(native=kernel_of(kernel))
    x[1] = torch.randn(x.shape[1])  # no row of the head stands out: a flat top
    exact = ops.linear(x, head.exact)
    ours = ops.linear(x, head)
    assert torch.equal(ours[1], exact[1])
    assert not torch.equal(ours[0], exact[0])


def test_large_batches_run_the_exact_head_alone():
    head, x = peaked_head()
    head.max_rows = x.shape[0] - 1
    assert torch.equal(ops.linear(x, head), ops.linear(x, head.exact))
    assert ops.linear(x[:0], head).shape == (0, head.exact.out_features)


# -- the choice --------------------------------------------------------------------------------


def test_auto_is_int4_on_cpu_for_q4_files_only():
    assert choose_weights("auto", False, CPU, {"Q4_1"}).int4
    assert choose_weights("auto", False, CPU, {"Q4_0", "Q6_K"}).int4  # what maps, maps
    assert not choose_weights("auto", False, CPU, {"Q8_0"}).int4
    assert not choose_weights("auto", False, CPU, set()).int4  # safetensors
    assert not choose_weights("auto", False, torch.device("cuda"), {"Q4_1"}).int4
    # --dtype alone keeps meaning "the model in that dtype": dense.
    assert not choose_weights("auto", True, CPU, {"Q4_1"}).int4
    assert choose_weights("int4", True, CPU, {"Q4_1"}).int4


def test_impossible_weights_are_refused():
    with pytest.raises(ValueError, match="CPU only"):
        choose_weights("int4", False, torch.device("cuda"), {"Q4_1"})
    with pytest.raises(ValueError, match="Q4_0/Q4_1"):
        choose_weights("int4", False, CPU, {"Q8_0"})
    with pytest.raises(ValueError, match="unknown weights"):
        dtype_for_weights(None, "int3")
    with pytest.raises(ValueError, match="need dtype"):
        dtype_for_weights("fp32", "bf16")


def test_dense_weights_set_the_dtype():
    assert dtype_for_weights(None, "bf16") == "bf16"
    assert dtype_for_weights("float32", "fp32") == "float32"
    assert dtype_for_weights("bf16", "int4") == "bf16"
    assert dtype_for_weights(None, "auto") is None


# -- the real model ----------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):"]
# Logits of the whole model against fp32, with the kernel on every row: measured max |diff|
# 0.34-1.28 on the prompts below (logits ~10-30; dense bf16 moves them 0.55-0.9 there), of
# which bf16-rounded scales alone make 0.2-0.4 and bf16 activations 0.3-0.66.
LOGITS_ATOL = 2.0
# The prefill through the panels against the fp32 model: fp32 rounding in another order, grown
# over 30 layers (measured max |diff| 1.2e-4 on the chat prompt's 37 positions).
PANELS_LOGITS_ATOL = 1e-3
# "The three primary colors are": fp32 greedy says " of" at its 4th token, 0.044 ahead of ":",
# which int4 picks (then ": red, blue, and yellow"). A near-tie, not a fault.
NEAR_TIE = 0.1


@pytest.fixture(scope="module")
def int4_runner():
    runner = load_real_runner("default")  # int4 on any CPU for this Q4_1 file, fp32 around it
    assert runner.info.weights == "int4" and runner.info.dtype == "float32"
    return runner


@pytest.fixture(scope="module")
def fp32_runner():
    runner = load_real_runner("fp32")
    assert runner.info.weights == "float32"
    return runner


@contextlib.contextmanager
def kernel_on_every_row(runner):
    """Run the int4 kernel whatever the batch size (no panels or dense copy for prefills and
    large batches; op by op, since `decode_layers` chooses for itself)."""
    layers = [lin for layer in runner.model.layers
              for lin in (layer.qkv, layer.out, layer.gate_up, layer.down)]
    saved = [lin.max_rows for lin in layers]
    decoder, runner.model.native_decoder = runner.model.native_decoder, None
    for lin in layers:
        lin.max_rows = 1 << 30
    try:
        yield
    finally:
        runner.model.native_decoder = decoder
        for lin, rows in zip(layers, saved, strict=True):
            lin.max_rows = rows


def steps_logits(runner, ids: list[int], decode: int) -> torch.Tensor:
    """fp32 logits of every prompt position (one prefill), then of `decode` single-token
    steps feeding `ids`' own continuation (teacher-forced, so both runners see one path)."""
    page = runner.info.page_size
    prompt = len(ids) - decode
    logits = []
    for start, end in [(0, prompt), *((i, i + 1) for i in range(prompt, len(ids)))]:
        call = Forward(owner="t", kv_pages=[6, 2, 4, 1][: -(-end // page)],
                       last_page_len=(end - 1) % page + 1, positions=list(range(start, end)),
                       tokens=ids[start:end], output_indices=list(range(end - start)))
        runner.check(call)
        logits.append(runner.logits([call]))
    return torch.cat(logits)


@pytest.mark.slow
def test_real_projections_match_dequantised_fp32(int4_runner, fp32_runner):
    """Every projection of the real model (qkv fused and Q/K rows un-permuted, gate/up fused)."""
    gen = torch.Generator().manual_seed(0)
    pairs = zip(int4_runner.model.layers, fp32_runner.model.layers, strict=True)
    for i, (ours, reference) in enumerate(pairs):
        for name in ("qkv", "out", "gate_up", "down"):
            layer, dense = getattr(ours, name), getattr(reference, name)
            assert isinstance(layer, ops.QuantLinear), (i, name)
            assert layer.native is not None or not cpu_kernels.available()
            if cpu_kernels.available() and not cpu_info().native_bf16:  # AVX2: no dense copy
                assert layer.panels is not None and layer.dense is None
            width = (layer.native.nibbles if layer.native else layer.packed).shape[1] * 2
            x = torch.randn(8, width, generator=gen)
            assert_close_relative(int4_matmul(x, layer), ops.linear(x, dense), LINEAR_RTOL)
            # What large batches run (the panels, or the dense copy in its own dtype: bf16
            # where the CPU computes bf16 natively) is the fp32 model's weights exactly: read
            # both out through an identity matrix.
            eye = torch.eye(width)
            if layer.panels is not None:
                assert torch.equal(ops.linear(eye, layer), ops.linear(eye, dense)), (i, name)
                continue
            copy_dtype = layer.dense.dtype
            assert torch.equal(ops.linear(eye.to(copy_dtype), layer.dense),
                               ops.linear(eye, dense).to(copy_dtype)), (i, name)
    head = int4_runner.model.lm_head
    if cpu_kernels.available() and not cpu_info().native_bf16:  # the Q8_0 head in panels too
        assert head.panels is not None
        eye = torch.eye(head.weight.shape[1])
        assert torch.equal(cpu_kernels.panel_matmul(eye, head.panels, None), head.weight.T)


@pytest.mark.slow
@pytest.mark.parametrize("text", [PROMPTS[0], "chat"])
def test_logits_of_prefill_and_decode_steps(int4_runner, fp32_runner, text):
    tokenizer = int4_runner.tokenizer
    prompt = tokenizer.encode(tokenizer.render_chat(CHAT) if text == "chat" else text)
    (continuation,) = generate(fp32_runner, [prompt], 6)
    ids = prompt + continuation
    reference = steps_logits(fp32_runner, ids, len(continuation))
    # The projections' error alone: the head's own tail is tested with its shortlist below.
    with kernel_on_every_row(int4_runner), head_shortlist(int4_runner, 0):
        ours = steps_logits(int4_runner, ids, len(continuation))
    assert (ours - reference).abs().max().item() < LOGITS_ATOL
    # The greedy path agrees (inside the prompt, predictions of the template's tokens may be
    # near-ties: 97% of the chat prompt's positions agree).
    path = slice(len(prompt) - 1, None)
    assert torch.equal(ours[path].argmax(-1), reference[path].argmax(-1))
    qkv = int4_runner.model.layers[0].qkv
    if len(prompt) > qkv.max_rows:  # the prefill runs the panels or the dense copy
        prefill = steps_logits(int4_runner, ids, len(continuation))[: len(prompt)]
        if qkv.panels is not None:  # the fp32 model's arithmetic, summed in another order
            assert (prefill - reference[: len(prompt)]).abs().max().item() < PANELS_LOGITS_ATOL
        elif qkv.dense.dtype == torch.float32:  # the fp32 model exactly
            assert torch.equal(prefill, reference[: len(prompt)])
        else:  # the model's projections in bf16 (a CPU with native bf16): within the int4 bound
            assert (prefill - reference[: len(prompt)]).abs().max().item() < LOGITS_ATOL


def agrees_until_a_near_tie(ours: list[int], reference: list[int], logits: torch.Tensor) -> bool:
    """`ours` equals `reference`, or leaves it only where the reference's two best were within
    NEAR_TIE (`logits`: fp32 reference logits along its own path, one row per step)."""
    for step, (mine, theirs) in enumerate(zip(ours, reference, strict=False)):
        if mine != theirs:
            best = torch.topk(logits[step], 2).values
            return (best[0] - best[1]).item() < NEAR_TIE and logits[step][mine] >= best[1]
    return len(ours) == len(reference)


def reference_logits(runner, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    ids = prompt + continuation
    return steps_logits(runner, ids, 0)[len(prompt) - 1 :]


@pytest.mark.slow
@pytest.mark.parametrize("everywhere", [False, True], ids=["default", "kernel-every-row"])
def test_greedy_text_equals_fp32(int4_runner, fp32_runner, everywhere):
    """The reference answers, alone and batched; the one divergence is a measured near-tie."""
    tokenizer = int4_runner.tokenizer
    prompts = [tokenizer.encode(tokenizer.render_chat(CHAT))]
    prompts += [tokenizer.encode(p) for p in PROMPTS]
    references = generate(fp32_runner, prompts, 12)
    with contextlib.ExitStack() as stack:
        if everywhere:
            stack.enter_context(kernel_on_every_row(int4_runner))
        batched = generate(int4_runner, prompts, 12)
        alone = [generate(int4_runner, [p], 12)[0] for p in prompts]
    assert tokenizer.decode(batched[0]) == tokenizer.decode(alone[0])
    assert tokenizer.decode(alone[0]) == "The capital of France is Paris."
    assert tokenizer.decode(alone[1]).startswith(", the city of Nova Haven")
    for outputs in (batched, alone):
        for i, (prompt, reference, ours) in enumerate(zip(prompts, references, outputs,
                                                          strict=True)):
            if i == 2:  # the primary colors
                logits = reference_logits(fp32_runner, prompt, reference)
                assert agrees_until_a_near_tie(ours, reference, logits), tokenizer.decode(ours)
            else:
                assert ours == reference, tokenizer.decode(ours)


# The two-stage LM head (ops.ShortlistHead) against the exact fp32 head on the same hidden
# states. Outside the shortlist a logit is the int4 copy's: measured max |diff| 4.98 over 248
# prefill and decode rows of the reference prompts (mean 0.42; logits up to ~45).
HEAD_TAIL_ATOL = 6.0


@contextlib.contextmanager
def head_shortlist(runner, max_rows: int):
    """The LM head in two stages for batches of up to `max_rows` rows (0: the exact head)."""
    head = runner.model.lm_head
    assert isinstance(head, ops.ShortlistHead)
    saved, head.max_rows = head.max_rows, max_rows
    try:
        yield
    finally:
        head.max_rows = saved


def exact_sums(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to the order of fp32 sums over the hidden size (logits of ~25: ~1e-4)."""
    return torch.allclose(ours, reference, rtol=0, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("text", [PROMPTS[1], "chat"])
def test_head_shortlist_logits_of_prefill_and_decode(int4_runner, text):
    tokenizer = int4_runner.tokenizer
    prompt = tokenizer.encode(tokenizer.render_chat(CHAT) if text == "chat" else text)
    with head_shortlist(int4_runner, 0):
        (continuation,) = generate(int4_runner, [prompt], 8)
        reference = steps_logits(int4_runner, prompt + continuation, len(continuation))
    with head_shortlist(int4_runner, 1 << 30):  # the prefill's rows too
        ours = steps_logits(int4_runner, prompt + continuation, len(continuation))
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    leading = reference.topk(16, dim=-1).indices
    near_top = reference >= reference.amax(-1, keepdim=True) - 1.0
    # oneDNN's sums bit for bit beside torch's kernel; the same sums in C's order beside the
    # native one (`cpu_kernels.shortlist_head`)
    same = torch.equal if int4_runner.model.lm_head.approx.native is None else exact_sums
    assert same(ours.gather(1, leading), reference.gather(1, leading))
    assert same(ours[near_top], reference[near_top])
    assert (ours - reference).abs().max().item() < HEAD_TAIL_ATOL


@pytest.mark.slow
def test_head_shortlist_keeps_greedy_text(int4_runner):
    """The reference answers, alone and batched, with and without the shortlist."""
    tokenizer = int4_runner.tokenizer
    prompts = [tokenizer.encode(tokenizer.render_chat(CHAT))]
    prompts += [tokenizer.encode(p) for p in PROMPTS]
    with head_shortlist(int4_runner, 0):
        references = generate(int4_runner, prompts, 12)
    with head_shortlist(int4_runner, 1 << 30):
        assert generate(int4_runner, prompts, 12) == references
        assert [generate(int4_runner, [p], 12)[0] for p in prompts] == references
    assert tokenizer.decode(references[0]) == "The capital of France is Paris."


# -- every layer in one native call ---------------------------------------------------------------


def decode_batch(page: int) -> list[Forward]:
    """Decode-sized calls over three prefilled contexts: a one-token step over consecutive pages
    (a span), one over scattered pages (a slot table), and three speculative tokens with a
    custom mask (skip the context's second key) in a group of their own."""
    return [
        Forward(owner="a", kv_pages=[0, 1], last_page_len=page // 2 + 1,
                positions=[page + page // 2], tokens=[42], output_indices=[0]),
        Forward(owner="b", kv_pages=[5, 3], last_page_len=3, positions=[page + 2], tokens=[7],
                output_indices=[0]),
        Forward(owner="c", kv_pages=[8], last_page_len=page // 2 + 3,
                positions=[page // 2 + i for i in range(3)], tokens=[11, 12, 13],
                masks=[[1, 1, page // 2 - 2 + i + 1] for i in range(3)],
                output_indices=[0, 1, 2]),
    ]


def prefill(runner, pages: list[int], length: int, seed: int) -> None:
    page = runner.info.page_size
    ids = torch.randint(100, 1000, (length,), generator=torch.Generator().manual_seed(seed))
    call = Forward(owner="p", kv_pages=pages[: -(-length // page)],
                   last_page_len=(length - 1) % page + 1, positions=list(range(length)),
                   tokens=ids.tolist(), output_indices=[])
    runner.check(call)
    runner.logits([call])


def wide_decode_batch(runner, count: int) -> list[Forward]:
    """One-token steps over `count` more prefilled contexts (pages 20 on)."""
    page = runner.info.page_size
    calls = []
    for j in range(count):
        prefill(runner, [20 + j], page // 2, seed=10 + j)
        calls.append(Forward(owner=f"w{j}", kv_pages=[20 + j], last_page_len=page // 2 + 1,
                             positions=[page // 2], tokens=[50 + j], output_indices=[0]))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("wide", [False, True], ids=["kernel-rows", "panel-rows"])
def test_native_decoder_matches_the_op_by_op_forward(int4_runner, wide):
    """`decoder.c` runs every layer of a decode batch in one call; the op-by-op forward (the
    same kernels with Python between them) gives the same logits and K/V, bit for bit. A batch
    of more rows than the int4 kernel takes runs the panels in both."""
    runner = int4_runner
    decoder = runner.model.native_decoder
    if decoder is None:
        pytest.skip("the native CPU kernels are unavailable here (see cpu_kernels.library)")
    page = runner.info.page_size
    prefill(runner, [0, 1], page + page // 2, seed=1)
    prefill(runner, [5, 3], page + 2, seed=2)
    prefill(runner, [8], page // 2, seed=3)
    calls = decode_batch(page)
    if wide:
        if decoder.max_rows <= runner.model.layers[0].qkv.max_rows:
            pytest.skip("no panels here: larger batches run op by op")
        calls += wide_decode_batch(runner, runner.model.layers[0].qkv.max_rows)
    for call in calls:
        runner.check(call)
    kv = runner.kv
    k0, v0 = kv.k.clone(), kv.v.clone()
    fused = runner.logits(calls)
    k1, v1 = kv.k.clone(), kv.v.clone()
    kv.k.copy_(k0)
    kv.v.copy_(v0)
    runner.model.native_decoder = None
    try:
        stepwise = runner.logits(calls)
    finally:
        runner.model.native_decoder = decoder
    assert fused.shape == stepwise.shape == (len(calls) + 2, runner.info.vocab_size)
    assert torch.equal(fused, stepwise)
    assert torch.equal(k1, kv.k) and torch.equal(v1, kv.v)
    assert not torch.equal(k1, k0)  # the step wrote its keys


@pytest.mark.slow
def test_native_decoder_is_used_for_decode_batches_only(int4_runner, monkeypatch):
    """Batches of long query blocks (prefill chunks), and without panels batches larger than
    the int4 kernel's rows, run op by op."""
    model = int4_runner.model
    if model.native_decoder is None:
        pytest.skip("the native CPU kernels are unavailable here (see cpu_kernels.library)")
    ran = []
    original = model.native_decoder.forward

    def counting(hidden, *args):
        ran.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(model.native_decoder, "forward", counting)
    page = int4_runner.info.page_size
    prefill(int4_runner, [0, 1], cpu_kernels.ATTENTION_MAX_QUERIES + 1, seed=4)
    assert ran == []
    if model.native_decoder.max_rows == model.layers[0].qkv.max_rows:  # no panels
        prefill(int4_runner, [0, 1], model.layers[0].qkv.max_rows + 1, seed=4)
        assert ran == []
    int4_runner.logits(decode_batch(page)[:2])
    assert ran == [2]
