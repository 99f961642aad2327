"""The Llama-family transformer (Llama, Mistral, Qwen2) over a paged KV cache.

One forward runs every token of a ragged batch through each layer together: the projections and
the MLP see a single `[tokens, hidden]` matrix, and only attention splits by sequence, along the
groups planned in `pie_trio.model.batch`.

Projection weights that arrive as `Q4Weight`s (int4 weights, CPU only) run through an int4
kernel (`ops.QuantLinear`), with fp32 panels of the same blocks (or a dense copy) for batches
too large for it to win; everything else is dense. The LM head is fp32; beside int4
projections small batches run it in two stages (`ops.ShortlistHead`): an int4 copy ranks the
vocabulary, the fp32 head scores the best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pie_trio.kernels import cpu_kernels, dispatch
from pie_trio.kernels import torch_ops as ops
from pie_trio.kernels.dispatch import PagedContext
from pie_trio.model.batch import AttentionGroup, ForwardBatch
from pie_trio.model.config import ModelConfig
from pie_trio.model.hardware import int4_dense_dtype
from pie_trio.model.kv_cache import KvCache
from pie_trio.model.quant import Q4Weight, Weight, pack_panels, pack_q4, pack_q8_panels_exactly


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: ops.Linear | ops.QuantLinear  # q, k and v projections fused: one matmul for all three
    out: ops.Linear | ops.QuantLinear
    post_norm: torch.Tensor
    gate_up: ops.Linear | ops.QuantLinear  # gate and up fused: [2 * ffn, hidden]
    down: ops.Linear | ops.QuantLinear


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None) -> torch.Tensor:
    """Rotary inverse frequencies, with the model's scaling applied."""
    dims = torch.arange(0, config.head_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (config.rope_theta ** (dims / config.head_dim))
    if freq_factors is not None:  # GGUF files carry Llama 3 scaling as per-dimension factors
        return inv_freq / freq_factors.float()
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"RoPE scaling {kind!r} is not supported")


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    middle = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(middle, blended, scaled)


def _dense_tensor(tensors: Mapping[str, Weight], name: str) -> torch.Tensor:
    """A tensor that is never int4 (embeddings, norms, biases, RoPE factors)."""
    tensor = tensors[name]
    if isinstance(tensor, Q4Weight):
        raise ValueError(f"{name} came as int4 blocks; only projections may be int4")
    return tensor


def _whole(projected: torch.Tensor) -> torch.Tensor:
    """One process holds every head and MLP column: its projections are already whole."""
    return projected


class LlamaModel:
    """Weights and forward pass; the KV cache is passed in, the model keeps no sequence state."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: Mapping[str, Weight],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.kernels = dispatch.select(device)

        def take(name: str) -> torch.Tensor:
            return _dense_tensor(tensors, name).to(device=device, dtype=dtype).contiguous()

        self.embed_tokens = take("model.embed_tokens.weight")
        # The final norm and the LM head run in fp32 whatever `dtype` is: at a logit of ~25 bf16
        # resolves only 0.125, so near-tied candidates (0.09 apart in the default model's answer
        # to a reference question) would come out equal and greedy decoding would pick by index.
        norm = _dense_tensor(tensors, "model.norm.weight")
        self.norm = norm.to(device=device, dtype=torch.float32)
        self.layers = [self._layer(tensors, i, take) for i in range(config.num_layers)]
        tied = config.tie_embeddings or "lm_head.weight" not in tensors
        head = _dense_tensor(tensors, "model.embed_tokens.weight" if tied else "lm_head.weight")
        self.lm_head = self._head(head.to(device=device, dtype=torch.float32).contiguous())
        freq_factors = _dense_tensor(tensors, "rope_freqs") if "rope_freqs" in tensors else None
        inv_freq = rope_inv_freq(config, freq_factors)
        self.rope_cos, self.rope_sin = ops.rotary_tables(
            inv_freq.to(device), config.max_position, dtype
        )
        self.scale = config.head_dim**-0.5
        # Tensor parallelism (`tensor_parallel.py`) sets this to an all-reduce: a shard's
        # attention output and down projections then yield partial sums of the whole layer's.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _whole
        # Every layer in one native call for decode-sized batches, where the weights allow it.
        self.native_decoder = self._native_decoder()
        # Reused gather buffers for context K/V (see ops.gather_kv); grown on demand.
        self._gather_k = torch.empty(0, dtype=dtype, device=device)
        self._gather_v = torch.empty(0, dtype=dtype, device=device)

    def _layer(
        self, tensors: Mapping[str, Weight], i: int, take: Callable[[str], torch.Tensor]
    ) -> LayerWeights:
        prefix = f"model.layers.{i}."
        attn = prefix + "self_attn."
        bias = None
        if self.config.qkv_bias:
            bias = torch.cat([take(attn + f"{p}_proj.bias") for p in ("q", "k", "v")])
        return LayerWeights(
            input_norm=take(prefix + "input_layernorm.weight"),
            qkv=self._linear([tensors[attn + f"{p}_proj.weight"] for p in ("q", "k", "v")], bias),
            out=self._linear([tensors[attn + "o_proj.weight"]]),
            post_norm=take(prefix + "post_attention_layernorm.weight"),
            gate_up=self._linear(
                [tensors[prefix + "mlp.gate_proj.weight"], tensors[prefix + "mlp.up_proj.weight"]]
            ),
            down=self._linear([tensors[prefix + "mlp.down_proj.weight"]]),
        )

    def _linear(
        self, parts: list[Weight], bias: torch.Tensor | None = None
    ) -> ops.Linear | ops.QuantLinear:
        """One projection from its parts, fused along the output dimension.

        Int4 when every part is a `Q4Weight` and the device is the CPU (the only kernel packed
        here); large batches run its fp32 panels where those would take the place of an fp32
        dense copy, else a dense copy (`int4_dense_dtype`). Dense otherwise.
        """
        quantised = [p for p in parts if isinstance(p, Q4Weight)]
        if self.device.type == "cpu" and len(quantised) == len(parts):
            weight = Q4Weight.cat(quantised)
            panels = pack_panels(weight) if self._panels_for_large_batches() else None
            if panels is not None:
                return pack_q4(weight, bias, panels=panels)
            dtype = int4_dense_dtype(self.dtype)
            dense = ops.pack_linear(self._dense(weight, dtype),
                                    None if bias is None else bias.to(dtype))
            return pack_q4(weight, bias, dense)
        return ops.pack_linear(torch.cat([self._dense(p) for p in parts]), bias)

    def _head(self, weight: torch.Tensor) -> ops.Linear | ops.ShortlistHead:
        """The fp32 LM head; beside int4 projections (the CPU's), in two stages over an int4
        copy, where reading the whole fp32 head was a third of a batch-1 step, and for large
        batches in 8-bit panels where the head is a dequantised Q8_0 tensor."""
        if self.weights != "int4":
            return ops.pack_linear(weight)
        panels = pack_q8_panels_exactly(weight) if self._panels_for_large_batches() else None
        return ops.pack_shortlist_head(weight, pack_q4(Q4Weight.quantize(weight)), panels=panels)

    def _panels_for_large_batches(self) -> bool:
        """Whether batches too large for the int4 kernel run `panels.c` (fp32 arithmetic from
        the blocks) rather than a dense copy: where that copy would be fp32. On a CPU with
        native bf16 the copy is bf16 and oneDNN's; the panels were measured on AVX2 only."""
        return int4_dense_dtype(self.dtype) == torch.float32

    def _native_decoder(self) -> cpu_kernels.NativeDecoder | None:
        """The layers in `decoder.c`'s form: fp32 with every projection native int4."""
        if not (self.kernels.native_cpu and self.dtype == torch.float32):
            return None

        def native(linear: ops.Linear | ops.QuantLinear) -> cpu_kernels.DecoderProjection | None:
            if not isinstance(linear, ops.QuantLinear) or linear.native is None:
                return None
            bias = linear.bias
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                return None
            return cpu_kernels.DecoderProjection(linear.native, bias, linear.panels)

        layers = []
        for layer in self.layers:
            parts = [native(linear) for linear in (layer.qkv, layer.out, layer.gate_up,
                                                   layer.down)]
            if any(part is None for part in parts):
                return None
            qkv, out, gate_up, down = parts
            assert qkv and out and gate_up and down  # narrowed by the check above
            layers.append(cpu_kernels.DecoderLayer(layer.input_norm, layer.post_norm, qkv, out,
                                                   gate_up, down))
        cfg = self.config
        return cpu_kernels.NativeDecoder(layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                         cfg.rms_norm_eps, self.scale, self.rope_cos,
                                         self.rope_sin, self._int4_max_rows())

    def _dense(self, weight: Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`weight` dense on the model's device, in `dtype` (default: the compute dtype)."""
        if isinstance(weight, Q4Weight):
            weight = weight.dequantize()
        return weight.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    @property
    def weights(self) -> str:
        """How the projections are stored: "int4", or the compute dtype's name when dense."""
        for layer in self.layers:
            linears = (layer.qkv, layer.out, layer.gate_up, layer.down)
            if any(isinstance(linear, ops.QuantLinear) for linear in linears):
                return "int4"
        return str(self.dtype).removeprefix("torch.")

    # -- forward -------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.embed_tokens)

    def inputs(self, batch: ForwardBatch, kv: KvCache) -> torch.Tensor:
        """The first hidden states `[rows, hidden]`: token embeddings and/or embedding slots."""
        if batch.token_ids is not None:
            return self.embed(batch.token_ids)
        hidden = torch.empty(
            batch.num_rows, self.config.hidden_size, dtype=self.dtype, device=self.device
        )
        # Without `token_ids`, the batch mixes inputs and gives both (rows, ids) pairs.
        assert batch.input_tokens is not None and batch.input_slots is not None
        token_rows, token_ids = batch.input_tokens
        slot_rows, slot_ids = batch.input_slots
        if len(token_rows):
            hidden.index_copy_(0, token_rows, self.embed(token_ids))
        hidden.index_copy_(0, slot_rows, kv.embeddings.index_select(0, slot_ids))
        return hidden

    def forward(self, batch: ForwardBatch, kv: KvCache) -> torch.Tensor:
        """Run every layer, writing K/V into the cache; returns logits (fp32) of output rows."""
        cfg = self.config
        hidden = self.inputs(batch, kv)
        spans = self._native_spans(batch)
        if spans is not None:
            assert self.native_decoder is not None  # spans are planned only beside it
            hidden = self.native_decoder.forward(hidden, batch.positions, batch.write_slots,
                                                 spans, kv.k, kv.v)
            return self.logits(hidden.index_select(0, batch.output_rows))
        rows = batch.num_rows
        store = self._store_kv(batch, hidden.dtype)
        q_size = cfg.num_heads * cfg.head_dim
        self._reserve_gather(batch.groups)
        norm = self.kernels.rms_norm
        add_norm = self.kernels.add_rms_norm
        eps = cfg.rms_norm_eps
        x = norm(hidden, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            q = store(ops.linear(x, layer.qkv), kv.k[i], kv.v[i])
            attn = self._attention(q, kv.k[i], kv.v[i], batch.groups)
            delta = self.reduce(ops.linear(attn.reshape(rows, q_size), layer.out))
            hidden, x = add_norm(hidden, delta, layer.post_norm, eps)
            mlp = self.kernels.silu_mul(ops.linear(x, layer.gate_up))
            delta = self.reduce(ops.linear(mlp, layer.down))
            if i + 1 < len(self.layers):  # the residual sum and the next layer's input norm
                hidden, x = add_norm(hidden, delta, self.layers[i + 1].input_norm, eps)
            else:
                hidden = hidden + delta
        return self.logits(hidden.index_select(0, batch.output_rows))

    def _native_spans(self, batch: ForwardBatch) -> list[cpu_kernels.AttentionSpan] | None:
        """The batch's attention groups for `native_decoder`, or None where it does not apply:
        no native decoder (weights or dtype), more rows than it takes, long query blocks, or a
        tensor-parallel shard (whose layers all-reduce)."""
        if (self.native_decoder is None or self.reduce is not _whole
                or not 0 < batch.num_rows <= self.native_decoder.max_rows):
            return None
        spans = []
        for group in batch.groups:
            if group.queries > cpu_kernels.ATTENTION_MAX_QUERIES:
                return None
            if isinstance(group.rows, slice):
                first, listed = group.rows.start, None
            else:
                first, listed = 0, group.rows
            context = PagedContext.from_slots(group.slots, group.span)
            spans.append(cpu_kernels.AttentionSpan(
                first, listed, group.valid, group.batch, group.queries, context.table,
                context.span_start, context.length, group.mask, group.causal,
            ))  # fmt: skip
        return spans

    def _int4_max_rows(self) -> int:
        """The most rows the projections run through the int4 kernel (more: the dense copy)."""
        qkv = self.layers[0].qkv
        return qkv.max_rows if isinstance(qkv, ops.QuantLinear) else 0

    def _store_kv(
        self, batch: ForwardBatch, dtype: torch.dtype
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """A layer's step from its QKV projection to its queries: rotate queries and keys by
        their positions, store keys and values at the batch's slots."""
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.kernels.native_cpu and dtype == torch.float32:  # one compiled loop

            def fused(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                      ) -> torch.Tensor:
                return self.kernels.rotary_kv_write(
                    qkv, self.rope_cos, self.rope_sin, batch.positions, batch.write_slots,
                    k_cache, v_cache, heads, kv_heads,
                )  # fmt: skip

            return fused
        cos = self.rope_cos.index_select(0, batch.positions)
        sin = self.rope_sin.index_select(0, batch.positions)
        rotated = heads + kv_heads

        def separate(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                     ) -> torch.Tensor:
            rows = qkv.shape[0]
            qk = ops.apply_rotary(
                qkv[:, : rotated * head_dim].view(rows, rotated, head_dim), cos, sin
            )
            v = qkv[:, rotated * head_dim :].view(rows, kv_heads, head_dim)
            ops.write_kv(k_cache, v_cache, batch.write_slots, qk[:, heads:], v)
            return qk[:, :heads]

        return separate

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[rows, vocab]` of final hidden states (norm and head in fp32)."""
        x = ops.rms_norm(hidden.float(), self.norm, self.config.rms_norm_eps)
        return ops.linear(x, self.lm_head)

    # -- attention -----------------------------------------------------------------------------

    def _attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        groups: list[AttentionGroup],
    ) -> torch.Tensor:
        if len(groups) == 1 and isinstance(groups[0].rows, slice) and groups[0].valid is None:
            group = groups[0]
            if group.rows == slice(0, q.shape[0]):
                return self._attend(group, q, k_cache, v_cache)
        out = torch.empty_like(q)
        for group in groups:
            result = self._attend(group, q[group.rows], k_cache, v_cache)
            if group.valid is None:
                out[group.rows] = result
            else:
                assert isinstance(group.rows, torch.Tensor)  # padding implies indexed rows
                out[group.rows[group.valid]] = result[group.valid]
        return out

    def _attend(
        self,
        group: AttentionGroup,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of one group; `q` holds exactly its (padded) query rows."""
        if self.kernels.cuda or self.kernels.native_attention(q, group.queries):
            # reads K/V straight from the pages, no gather
            context = PagedContext.from_slots(group.slots, group.span)
            return self.kernels.paged_attention(q, k_cache, v_cache, context, group.batch,
                                                group.queries, group.mask, group.causal,
                                                self.scale)
        if group.span is not None:
            k = k_cache[:, group.span[0] : group.span[1]].unsqueeze(1)
            v = v_cache[:, group.span[0] : group.span[1]].unsqueeze(1)
        else:
            assert group.slots is not None  # a group without a span gathers its slots
            k = ops.gather_kv(k_cache, group.slots, self._gather_k)
            v = ops.gather_kv(v_cache, group.slots, self._gather_v)
        if group.queries > 1 and group.batch == 1 and group.valid is None:
            return ops.prefill_attention(q, k[:, 0], v[:, 0], group.mask, group.causal, self.scale)
        shaped = q.view(group.batch, group.queries, *q.shape[1:])
        mask = group.mask
        out = ops.decode_attention(shaped, k, v, mask, self.scale)
        return out.reshape(group.batch * group.queries, *q.shape[1:])

    def _reserve_gather(self, groups: list[AttentionGroup]) -> None:
        """Grow the gather buffers to the largest context any group will gather this pass."""
        needed = (
            max((g.slots.numel() for g in groups if g.slots is not None), default=0)
            * self.config.num_kv_heads
            * self.config.head_dim
        )
        if needed > self._gather_k.numel():
            self._gather_k = torch.empty(needed, dtype=self.dtype, device=self.device)
            self._gather_v = torch.empty(needed, dtype=self.dtype, device=self.device)
