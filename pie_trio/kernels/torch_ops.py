"""Reference tensor ops of the Llama forward, in plain torch (CPU and CUDA alike).

Each op here is one small, well-defined function, so a raw CUDA kernel (see kernels/cuda/) can
replace it one at a time and be checked against it. `linear` takes dense weights (`Linear`),
int4 ones (`QuantLinear`, torch's CPU weight-only kernel) and the two-stage LM head
(`ShortlistHead`) alike.

Layouts:
- activations are token-major: `[tokens, heads, head_dim]`;
- one layer's KV cache is `[kv_heads, slots, head_dim]` (slot = page * page_size + offset), so a
  gather of context slots comes out as `[kv_heads, batch, length, head_dim]`, ready for a batched
  matmul with no copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pie_trio.kernels import cpu_kernels


@dataclass
class Linear:
    """A linear layer's weights, in whatever form runs fastest on their device.

    On CPU the weight is reordered once into oneDNN's blocked layout (`packed`): the matmuls of
    a decode step (a few rows against a large weight) then run ~1.5-2x faster than `F.linear`
    on the plain `[out, in]` tensor, with identical results in bf16.
    """

    weight: torch.Tensor | None  # [out, in]; None once packed
    bias: torch.Tensor | None
    packed: torch.Tensor | None = None
    out_features: int = 0

    @property
    def dtype(self) -> torch.dtype:
        weight = self.packed if self.packed is not None else self.weight
        assert weight is not None  # a Linear holds its weight or its packed form
        return weight.dtype


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """Prepare `weight` `[out, in]` (and `bias`) for `linear`."""
    out_features = weight.shape[0]
    # torch leaves `mkldnn.is_available` unannotated; it returns a bool.
    mkldnn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if weight.device.type == "cpu" and mkldnn:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):  # a torch build without these oneDNN ops
            pass
        else:
            return Linear(None, bias, packed, out_features)
    return Linear(weight, bias, None, out_features)


def linear(x: torch.Tensor, layer: Linear | QuantLinear | ShortlistHead) -> torch.Tensor:
    """`x @ weight.T + bias` for `x` `[rows, in]`, in `x`'s dtype."""
    if isinstance(layer, QuantLinear):
        return _int4_linear(x, layer)
    if isinstance(layer, ShortlistHead):
        return _shortlist_linear(x, layer)
    if layer.packed is None:
        assert layer.weight is not None  # a Linear holds its weight or its packed form
        return F.linear(x, layer.weight, layer.bias)
    if x.shape[0] == 0:
        return x.new_empty(0, layer.out_features)
    return _packed_linear(x, layer.packed, layer.bias)


def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


# Batches of more rows than this run a `QuantLinear` through its dense copy. On an AVX2 CPU
# (2 threads, SmolLM2-135M shapes) the int4 kernel beats oneDNN's fp32 matmul up to ~16-20
# rows (2.8x at 1 row, 1.4x at 8) and loses from 24 on (2.3x slower at 128 and 512 rows).
INT4_MAX_ROWS = 16
# The same for the native kernel (`cpu_kernels`), whose cost grows with rows faster. AVX2 (one
# step's 120 projections, 30 layers' distinct weights, 2 threads, SmolLM2-135M shapes): 6.7 / 31 /
# 60 ms at 1 / 8 / 16 rows against oneDNN fp32's 29 / 40 / 51.
NATIVE_INT4_MAX_ROWS = 12
# With AVX-512 VNNI the kernel beats oneDNN fp32 up to ~24 rows (12 / 24 / 31 ms at 8 / 16 / 24
# rows against 24 / 28 / 37) and native bf16 up to ~8 (12 against 14 ms; 19 against 16 at 12),
# but up to 16 rows decode with the kernel still wins end to end: every layer then runs in one
# call (`decode_layers`; 266 against 244 tokens/s at 12 rows, 278 against 259 at 16, 251
# against 317 at 24 on an AVX-512 BF16 CPU).
VNNI_INT4_MAX_ROWS = 16
# Beside its panels (`panels.c`) the AVX2 kernel keeps batches of up to 4 rows: one step's 120
# projections (30 layers' distinct weights, 2 threads) took 4.1 / 10.3 / 14.8 / 21.3 / 30.3 ms
# through the kernel at 1 / 4 / 6 / 8 / 12 rows against the panels' 9.6 / 10.5 / 12.0 / 14.6 /
# 18.4; decode of 8 sequences ran at 269 and 236 against 226 and 200 tokens/s with 12 rows.
PANELS_INT4_MAX_ROWS = 4


def native_int4_max_rows(panels: bool = False) -> int:
    """The most rows a native `QuantLinear` runs through the kernel (more: its panels, or the
    dense copy)."""
    if cpu_kernels.vnni():
        return VNNI_INT4_MAX_ROWS
    return PANELS_INT4_MAX_ROWS if panels else NATIVE_INT4_MAX_ROWS


@dataclass
class QuantLinear:
    """A linear layer with int4 weights (groups of 32 inputs): the native kernel's form
    (`native`, `cpu_kernels.q4_matmul`) where it is available, else torch's CPU weight-only
    kernel's (`packed`).

    torch's kernel dequantises `w = (q - 8) * scale + zero` per group and takes bf16 activations
    and bf16 scales (fp32 scales are refused with bf16 input; fp32 input runs a fallback ~10x
    slower), so `linear` casts the input to bf16 and the output back: the model around it
    keeps its own compute dtype. Batches of more than `max_rows` rows (large decode batches,
    prefill chunks) run the same weights in fp32 arithmetic: from `panels` (`panels.c`,
    dequantised as they are used) where they exist, else from `dense`, a dequantised copy; with
    neither, the kernel takes every batch.
    """

    packed: torch.Tensor | None  # torch's kernel's layout of q [out, in]; None beside `native`
    scales_and_zeros: torch.Tensor | None  # bf16 [in / 32, out, 2]
    bias: torch.Tensor | None
    out_features: int
    group_size: int  # inputs per scale: 32 for GGUF Q4_0/Q4_1 blocks
    dense: Linear | None = None
    max_rows: int = INT4_MAX_ROWS
    native: cpu_kernels.NativeQ4 | None = None
    panels: cpu_kernels.Panels | None = None


def pack_int4(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None = None,
    dense: Linear | None = None,
    panels: cpu_kernels.Panels | None = None,
) -> QuantLinear:
    """Prepare int4 weights `w = (q - 8) * scale + zero` for `linear`.

    q: integers 0..15 `[out, in]`; scale, zero: `[out, in / 32]` (rounded to bf16 here: the
    kernel's format). CPU only: the CUDA kernel packs differently.
    """
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)
    group_size = q.shape[1] // scale.shape[1]
    return QuantLinear(packed, scales_and_zeros.contiguous(), bias, q.shape[0], group_size, dense,
                       panels=panels)


def pack_native_q4(
    native: cpu_kernels.NativeQ4,
    bias: torch.Tensor | None = None,
    dense: Linear | None = None,
    panels: cpu_kernels.Panels | None = None,
) -> QuantLinear:
    """Int4 weights in the native kernel's form (`cpu_kernels.pack_q4`) for `linear`."""
    return QuantLinear(None, None, bias, native.out_features, cpu_kernels.GROUP, dense,
                       native_int4_max_rows(panels is not None), native, panels)


def _int4_linear(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    if x.shape[0] > layer.max_rows:
        if layer.panels is not None:
            return cpu_kernels.panel_matmul(x, layer.panels, layer.bias)
        if layer.dense is not None:
            if layer.dense.dtype != x.dtype:  # a bf16 copy beside fp32 compute (docs/model.md)
                return linear(x.to(layer.dense.dtype), layer.dense).to(x.dtype)
            return linear(x, layer.dense)
    if x.shape[0] == 0:
        return x.new_empty(0, layer.out_features)
    if layer.native is not None:
        return cpu_kernels.q4_matmul(x, layer.native, layer.bias)
    assert layer.packed is not None and layer.scales_and_zeros is not None
    out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), layer.packed, layer.group_size, layer.scales_and_zeros
    ).to(x.dtype)
    return out if layer.bias is None else out.add_(layer.bias)


# A `ShortlistHead`'s defaults, measured on SmolLM2-135M (docs/model.md, "The LM head in two
# stages"). Rows: batches of up to this many run in two stages, larger ones the exact head alone
# (the int4 kernel's lead over oneDNN's fp32 matmul shrinks with rows while the shortlist's cost
# grows: a win at 1-2 rows, a tie at 4, a loss from 8; beside the native kernel, with its exact
# stage in C, 1.8 / 3.2 / 6.6 ms against 7.7 / 7.4 / 9.0 at 1 / 4 / 8 rows, and a loss from 12).
# Candidates and margin: the int4 copy's error on the tokens at the top is at most ~1.9 (the
# fp32 argmax ranked at worst 9th in its order); with 64 candidates, 1% of rows fall short of a
# 3.0 margin and are recomputed in full.
SHORTLIST_MAX_ROWS = 2
NATIVE_SHORTLIST_MAX_ROWS = 8
# Beside the head's panels, which are exact: 0.97 / 1.45 / 2.89 / 5.18 ms at 1 / 2 / 4 / 8 rows
# in two stages against 2.46 / 2.46 / 2.59 / 3.81 ms through the panels.
PANELS_SHORTLIST_MAX_ROWS = 3
SHORTLIST_CANDIDATES = 64
SHORTLIST_MARGIN = 3.0


@dataclass
class ShortlistHead:
    """An LM head exact where it matters: approximate logits for the whole vocabulary from an
    int4 copy of the head, then the exact head's logits for each row's `candidates` best.

    Beside torch's int4 kernel the exact values are those of `linear(x, exact)` bit for bit:
    oneDNN's packed fp32 matmul sums each output in an order that depends on neither the row
    count nor the other outputs, so the candidates' rows, packed alone, give the very same
    numbers. Beside the native one, `cpu_kernels.shortlist_head` selects and takes the fp32 dot
    products in C (without the reorder and a dozen ops, ~1.5 ms less a step), equal to oneDNN's
    up to the order of the sums (~4e-6 relative). Logits left out of the shortlist carry the
    int4 copy's error. A row whose best exact logit is not `margin` above every approximate one
    left out is recomputed exactly in full, so with `margin` above the copy's error near the top
    no token left out can be the argmax.
    """

    exact: Linear  # the fp32 head, oneDNN-packed: what rows run without a shortlist
    weight: torch.Tensor  # the same `[vocab, hidden]` rows unpacked, to gather candidates from
    approx: QuantLinear  # the int4 copy, run by its kernel whatever the row count
    candidates: int
    margin: float
    max_rows: int = SHORTLIST_MAX_ROWS
    panels: cpu_kernels.Panels | None = None  # the exact head in 8-bit panels, for large batches


def pack_shortlist_head(
    weight: torch.Tensor,
    approx: QuantLinear,
    candidates: int = SHORTLIST_CANDIDATES,
    margin: float = SHORTLIST_MARGIN,
    panels: cpu_kernels.Panels | None = None,
) -> Linear | ShortlistHead:
    """The fp32 head `weight` `[vocab, hidden]` in two stages over its int4 copy `approx`; the
    plain exact head where oneDNN is missing (the shortlist could not match it bit for bit) or
    the vocabulary is no larger than the shortlist. Batches too large for two stages run
    `panels` (the same values, `panels.c`) where given, else the exact head."""
    exact = pack_linear(weight)
    if exact.packed is None or weight.shape[0] <= candidates:
        return exact
    rows = SHORTLIST_MAX_ROWS if approx.native is None else NATIVE_SHORTLIST_MAX_ROWS
    if panels is not None:
        rows = min(rows, PANELS_SHORTLIST_MAX_ROWS)
    return ShortlistHead(exact, weight, approx, candidates, margin, rows, panels)


def _shortlist_linear(x: torch.Tensor, head: ShortlistHead) -> torch.Tensor:
    if x.shape[0] > head.max_rows:
        if head.panels is not None:
            return cpu_kernels.panel_matmul(x, head.panels, None)
        return linear(x, head.exact)
    if x.shape[0] == 0:
        return linear(x, head.exact)
    logits = _int4_linear(x, head.approx)
    if head.approx.native is not None and logits.dtype == torch.float32:
        unsure = cpu_kernels.shortlist_head(x, head.weight, logits, head.candidates,
                                            head.margin)
    else:
        unsure = _exact_stage(x, head, logits)
    if len(unsure):  # a flat top: the shortlist may have missed the argmax
        logits.index_copy_(0, unsure, linear(x.index_select(0, unsure), head.exact))
    return logits


def _exact_stage(x: torch.Tensor, head: ShortlistHead, logits: torch.Tensor) -> torch.Tensor:
    """The shortlist's exact logits by oneDNN, in place; returns the rows with a flat top."""
    with _one_thread():
        best = logits.topk(head.candidates + 1, dim=-1)
        shortlist = best.indices[:, :-1]
        vocab_rows, where = torch.unique(shortlist, return_inverse=True)
        rows = head.weight.index_select(0, vocab_rows)
        exact = _packed_linear(x, torch.ops.mkldnn._reorder_linear_weight(rows), None)
        values = exact.gather(1, where)
        logits.scatter_(1, shortlist, values)
    return (values.amax(dim=-1) - best.values[:, -1] < head.margin).nonzero().squeeze(1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run a few small ops on this thread alone: on cores shared with other processes, each
    parallel region waits for its descheduled threads (the exact stage took 16.5 ms on two
    threads and 1.7 ms on one, under load; ~0.6 ms either way on an idle machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dimension, scaled by `weight`."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotary_tables(
    inv_freq: torch.Tensor, max_position: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables `[max_position, head_dim]`: cos of each angle, and its sin signed for
    `apply_rotary` (`-sin` on the first half, `+sin` on the second).

    Angles are computed in fp32 and only then rounded to `dtype`, as transformers does.
    """
    positions = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq.float())
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[tokens, heads, head_dim]` by per-token angles (tables: `[tokens, head_dim]`
    rows of `rotary_tables`).

    The "rotate half" convention of Hugging Face checkpoints, dimension i pairing with i + d/2:
    `[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`, computed as
    `x * cos + roll(x, d/2) * signed_sin` in two fused kernels instead of eight.
    """
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos.unsqueeze(1), x.roll(half, dims=-1), signed_sin.unsqueeze(1))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: `silu(gate) * up` for the fused `[tokens, 2 * ffn]` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Store new keys/values `[tokens, kv_heads, head_dim]` into cache slots `[tokens]`."""
    k_cache.index_copy_(1, slots, k.transpose(0, 1))
    v_cache.index_copy_(1, slots, v.transpose(0, 1))


def gather_kv(
    cache: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Context rows `[kv_heads, batch, length, head_dim]` for slot ids `[batch, length]`.

    `out`, when given, is a preallocated buffer of the right shape: on CPU a fresh multi-MB
    tensor per layer costs page faults that outweigh the copy itself.
    """
    kv_heads, _, head_dim = cache.shape
    batch, length = slots.shape
    flat = slots.reshape(-1)
    if out is None:
        rows = cache.index_select(1, flat)
    else:
        buffer = out[: kv_heads * flat.numel() * head_dim].view(kv_heads, -1, head_dim)
        rows = torch.index_select(cache, 1, flat, out=buffer)
    return rows.view(kv_heads, batch, length, head_dim)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Attention of one sequence's query block over its context.

    q: `[queries, heads, head_dim]`; k, v: `[kv_heads, length, head_dim]`; mask: bool
    `[queries, length]` (True = attend) or None with `causal` saying whether the block is the
    whole context (plain causal) or attends everything. Returns `[queries, heads, head_dim]`.
    Rows with nothing to attend come out as zeros.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=True,
    )
    if mask is not None and out.is_cuda:
        out = out.nan_to_num(0.0)
    return out.squeeze(0).transpose(0, 1)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of a padded batch of short query blocks (decode steps) over their contexts.

    q: `[batch, queries, heads, head_dim]`; k, v: `[kv_heads, batch, length, head_dim]`;
    mask: bool `[batch, queries, length]` (True = attend) or None to attend every key.
    Returns `[batch, queries, heads, head_dim]`; rows with nothing to attend are zeros.

    The query heads of each KV head are stacked into one block (`group * queries` rows), so K/V
    are never repeated per query head.
    """
    batch, queries, heads, head_dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    packed = q.view(batch, queries, kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
    packed = packed.reshape(kv_heads, batch, group * queries, head_dim)
    if mask is not None:
        length = mask.shape[-1]
        mask = mask.view(1, batch, 1, queries, length).expand(1, batch, group, queries, length)
        mask = mask.reshape(1, batch, group * queries, length)
    if batch == 1 or q.is_cuda:
        out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale)
        if mask is not None and out.is_cuda:
            out = out.nan_to_num(0.0)
    else:
        # Many sequences with short queries: on CPU plain batched matmuls beat SDPA's kernel
        # about 2x at these shapes.
        scores = torch.matmul(packed, k.transpose(-1, -2)).float().mul_(scale)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if mask is not None:
            probs = probs.nan_to_num_(0.0)
        out = torch.matmul(probs.to(v.dtype), v)
    out = out.view(kv_heads, batch, group, queries, head_dim).permute(1, 3, 0, 2, 4)
    return out.reshape(batch, queries, heads, head_dim)
