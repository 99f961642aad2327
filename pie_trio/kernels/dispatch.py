"""Which implementation of each hot op runs: a raw CUDA kernel (`cuda_kernels`) or its torch
reference, chosen once per device.

`select(device)` returns a `Kernels`: on CUDA with CuPy importable, and the kernels enabled
(`PIE_TRIO_CUDA_KERNELS=1`), it runs the raw kernels wherever their shape limits allow and the
torch references elsewhere; on the CPU (or without CuPy) it is the torch references throughout,
so the CPU path is the very code it always was.
Each op's reference is written here beside its dispatch, from the functions of `torch_ops`, and
the GPU tests hold every kernel to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pie_trio.kernels import cpu_kernels, cuda_kernels
from pie_trio.kernels import torch_ops as ops

log = logging.getLogger(__name__)

# "1" turns the raw kernels on. They stay off by default until `scripts/gpu_check.sh` has held
# them to their references on a GPU; a kernel that has never run must not be the default path.
ENV_SWITCH = "PIE_TRIO_CUDA_KERNELS"


@dataclass(frozen=True)
class PagedContext:
    """Where each sequence's keys sit in the KV pool, and how many it has.

    Key j of sequence b is slot `table[b, j // page_size] * page_size + j % page_size`; a slot
    table is a page table with `page_size` 1. Without a table the (single) context is the
    consecutive slots from `span_start`. `lengths` (int32 `[batch]`) gives each sequence's key
    count; without it every sequence has `length` keys (also the width of any mask).
    """

    table: torch.Tensor | None
    page_size: int
    span_start: int
    lengths: torch.Tensor | None
    length: int

    @classmethod
    def from_slots(
        cls, slots: torch.Tensor | None, span: tuple[int, int] | None
    ) -> PagedContext:
        """The context of an attention group: its slot table `[batch, length]`, or its span."""
        if slots is not None:
            return cls(slots, 1, 0, None, slots.shape[1])
        assert span is not None
        return cls(None, 1, span[0], None, span[1] - span[0])

    def slot_ids(self, batch: int) -> torch.Tensor:
        """Slot ids `[batch, length]` of every key (padding keys point at valid slots)."""
        if self.table is None:
            return torch.arange(self.span_start, self.span_start + self.length).expand(batch, -1)
        keys = torch.arange(self.length, device=self.table.device)
        pages = self.table[:, keys // self.page_size]
        return pages * self.page_size + keys % self.page_size

    def key_mask(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Bool `[batch, length]`: which keys exist, or None when all `length` do."""
        if self.lengths is None:
            return None
        keys = torch.arange(self.length, device=device)
        return keys.unsqueeze(0) < self.lengths.to(device).unsqueeze(1)


@dataclass(frozen=True)
class Kernels:
    """The hot ops for one device. `cuda` says whether the raw kernels are in use; `native_cpu`
    whether the CPU's compiled ones (`cpu_kernels`) are, for fp32 on the CPU."""

    cuda: bool
    reason: str = ""  # why the kernels are off, when they are
    native_cpu: bool = False

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        context: PagedContext,
        batch: int,
        queries: int,
        mask: torch.Tensor | None,
        causal: bool,
        scale: float,
    ) -> torch.Tensor:
        """Attention of `[batch * queries, heads, d]` query rows over their paged contexts.

        mask: bool `[batch, queries, length]` (True = attend); `causal`: query i of n sees keys
        up to `length_b - n + i`. Returns `[batch * queries, heads, d]`; rows with nothing to
        attend are zeros.
        """
        heads, head_dim = q.shape[1], q.shape[2]
        if self.native_attention(q, queries):
            return cpu_kernels.paged_attention(
                q, k_cache, v_cache, context.table, context.page_size, context.span_start,
                context.lengths, context.length, mask, batch, queries, causal, scale,
            )  # fmt: skip
        if self.cuda and cuda_kernels.attention_fits(heads, k_cache.shape[0], head_dim):
            table = context.table
            if table is not None and table.dtype != torch.long:
                table = table.long()
            lengths = context.lengths
            if lengths is not None and lengths.dtype != torch.int32:
                lengths = lengths.int()
            return cuda_kernels.paged_attention(
                q, k_cache, v_cache, table, context.page_size, context.span_start, lengths,
                context.length, mask, batch, queries, causal, scale,
            )  # fmt: skip
        return reference_paged_attention(
            q, k_cache, v_cache, context, batch, queries, mask, causal, scale
        )

    def add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum `hidden + delta` and its RMS norm scaled by `weight`."""
        if self.cuda and hidden.dtype in cuda_kernels.DTYPE_SUFFIX:
            return cuda_kernels.add_rms_norm(hidden, delta, weight, eps)
        if self._native(hidden, weight):
            return cpu_kernels.add_rms_norm(hidden, delta, weight, eps)
        total = hidden + delta
        return total, ops.rms_norm(total, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU of a fused gate/up projection `[rows, 2 * ffn]`: `silu(gate) * up`."""
        if self.native_cpu and gate_up.dtype == torch.float32 and gate_up.device.type == "cpu":
            return cpu_kernels.silu_mul(gate_up)
        return ops.silu_mul(gate_up)

    def native_attention(self, q: torch.Tensor, queries: int) -> bool:
        """Whether `paged_attention` of these query rows runs the CPU's compiled loops."""
        return (self.native_cpu and q.dtype == torch.float32 and q.device.type == "cpu"
                and queries <= cpu_kernels.ATTENTION_MAX_QUERIES)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMS norm of `x` `[rows, dim]` over its last dimension, scaled by `weight`."""
        if self._native(x, weight):
            return cpu_kernels.add_rms_norm(x, None, weight, eps)[1]
        return ops.rms_norm(x, weight, eps)

    def _native(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (self.native_cpu and x.dtype == weight.dtype == torch.float32
                and x.device.type == "cpu" and x.dim() == 2 and weight.is_contiguous())

    def rotary_kv_write(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        heads: int,
        kv_heads: int,
    ) -> torch.Tensor:
        """Rotate the queries and keys of a fused QKV projection `[rows, (h + 2 kv) * d]`;
        store keys and values into cache `slots` (negative: not stored). Returns the queries
        `[rows, heads, d]`. cos/sin: the full `rotary_tables`, indexed by `positions`."""
        head_dim = cos.shape[-1]
        if self._native(qkv, cos):
            return cpu_kernels.rotary_kv_write(
                qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads
            )
        if self.cuda and qkv.dtype in cuda_kernels.DTYPE_SUFFIX:
            return cuda_kernels.rotary_kv_write(
                qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads, head_dim
            )
        return reference_rotary_kv_write(
            qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads
        )

    def sample_rows(self, logits: torch.Tensor, rows: SamplingRows,
                    generator: torch.Generator) -> torch.Tensor:
        """Shape (vocabulary masks, logit bias) every row of `logits` in place and draw one
        token per row with the kernel. CUDA only: on other devices the model's own sampling
        (pie_trio/model/sampling.py) is the reference and runs instead."""
        if not self.cuda:
            raise cuda_kernels.KernelError(f"no sampling kernel here: {self.reason}")
        t = rows.tensors(logits.device, logits.shape[1], generator)
        return cuda_kernels.sample_rows(logits, *t)


def select(device: torch.device, enabled: bool | None = None) -> Kernels:
    """The op set for `device`: raw kernels on CUDA when CuPy works there and they are enabled
    (`enabled`, or else the environment variable `PIE_TRIO_CUDA_KERNELS` set to "1")."""
    if enabled is None:
        enabled = os.environ.get(ENV_SWITCH, "0") == "1"
    if device.type != "cuda":
        native = device.type == "cpu" and cpu_kernels.available()
        return Kernels(False, f"device is {device.type}", native_cpu=native)
    if not enabled:
        return Kernels(False, f"turned off (set {ENV_SWITCH}=1 to use them)")
    reason = cuda_kernels.unavailable_reason()
    if reason is not None:
        log.warning("raw CUDA kernels off, torch references run instead: %s", reason)
        return Kernels(False, reason)
    return Kernels(True)


# -- references --------------------------------------------------------------------------------


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context: PagedContext,
    batch: int,
    queries: int,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """`Kernels.paged_attention` in torch: gather the contexts, then `ops.decode_attention`."""
    rows, heads, head_dim = q.shape
    if rows == 0:
        return q.new_zeros(rows, heads, head_dim)
    slots = context.slot_ids(batch).to(q.device)
    k = ops.gather_kv(k_cache, slots)
    v = ops.gather_kv(v_cache, slots)
    allowed = attention_mask(context, batch, queries, mask, causal, q.device)
    out = ops.decode_attention(q.reshape(batch, queries, heads, head_dim), k, v, allowed, scale)
    return out.reshape(rows, heads, head_dim)


def attention_mask(
    context: PagedContext,
    batch: int,
    queries: int,
    mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """The bool `[batch, queries, length]` mask `paged_attention` applies, None for "all"."""
    allowed = None if mask is None else mask.reshape(batch, queries, context.length)
    keys = context.key_mask(batch, device)
    if keys is not None:
        keys = keys.unsqueeze(1)
        allowed = keys if allowed is None else allowed & keys
    if causal:
        lengths = (
            context.lengths.to(device).long()
            if context.lengths is not None
            else torch.full((batch,), context.length, device=device)
        )
        last = lengths.view(batch, 1, 1) - queries + torch.arange(queries, device=device).view(
            1, queries, 1
        )
        before = torch.arange(context.length, device=device).view(1, 1, -1) <= last
        allowed = before if allowed is None else allowed & before
    if allowed is not None:
        allowed = allowed.expand(batch, queries, context.length)
    return allowed


def reference_rotary_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """`Kernels.rotary_kv_write` in torch: `ops.apply_rotary`, then `ops.write_kv`."""
    rows, head_dim = qkv.shape[0], cos.shape[-1]
    rotated = heads + kv_heads
    qk = ops.apply_rotary(
        qkv[:, : rotated * head_dim].view(rows, rotated, head_dim),
        cos.index_select(0, positions),
        sin.index_select(0, positions),
    )
    k = qk[:, heads:]
    v = qkv[:, rotated * head_dim :].view(rows, kv_heads, head_dim)
    stored = slots >= 0
    if not bool(stored.all()):
        k, v, slots = k[stored], v[stored], slots[stored]
    ops.write_kv(k_cache, v_cache, slots, k, v)
    return qk[:, :heads]


# -- sampling rows -----------------------------------------------------------------------------

SEED_MIX = 0x9E3779B97F4A7C15
SEED_MASK = 2**63 - 1


@dataclass
class SamplingRows:
    """Per-row parameters of one batched draw, gathered call by call on the host.

    A call's rows share its sampler, its vocabulary mask (one mask row, referenced by index)
    and its logit bias (CSR: offsets into ids/values). Temperature 0 is greedy. Seeds are
    mixed per row (`seed * SEED_MIX + row`); a call without a seed gets the batch's random base
    (one draw from the runner's generator) plus its row number instead.
    """

    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    random_seed: list[bool] = field(default_factory=list)
    masks: list[bytes] = field(default_factory=list)
    mask_index: list[int] = field(default_factory=list)
    bias_offsets: list[int] = field(default_factory=lambda: [0])
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)

    def add(
        self,
        count: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | None = None,
        vocab_mask: bytes | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> None:
        """The `count` output rows of one call."""
        mask_row = -1
        if vocab_mask is not None:
            mask_row = len(self.masks)
            self.masks.append(vocab_mask)
        for row in range(count):
            self.temperature.append(temperature)
            self.top_k.append(top_k)
            self.top_p.append(top_p)
            self.min_p.append(min_p)
            self.random_seed.append(seed is None)
            base = len(self.seeds) if seed is None else seed * SEED_MIX + row
            self.seeds.append(base & SEED_MASK)
            self.mask_index.append(mask_row)
            for token, bias in (logit_bias or {}).items():
                self.bias_ids.append(token)
                self.bias_values.append(bias)
            self.bias_offsets.append(len(self.bias_ids))

    def __len__(self) -> int:
        return len(self.temperature)

    def tensors(
        self, device: torch.device, vocab: int, generator: torch.Generator
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor | None, torch.Tensor | None,
        torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
    ]:  # fmt: skip
        """The kernel's arguments after `logits`, on `device` (absent parts as None)."""
        def host(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        seeds = host(self.seeds, torch.long)
        if any(self.random_seed):
            base = torch.randint(0, SEED_MASK, (1,), generator=generator, device=generator.device)
            seeds = seeds + base.to(device) * host(self.random_seed, torch.long)
        masks = mask_index = None
        if self.masks:
            width = (vocab + 7) // 8
            rows = [m[:width].ljust(width, b"\0") for m in self.masks]
            masks = torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8)
            masks = masks.view(len(rows), width).to(device)
            mask_index = host(self.mask_index, torch.int32)
        offsets = ids = values = None
        if self.bias_ids:
            offsets = host(self.bias_offsets, torch.int32)
            ids = host(self.bias_ids, torch.int32)
            values = host(self.bias_values, torch.float32)
        return (
            host(self.temperature, torch.float32),
            host(self.top_k, torch.int32),
            host(self.top_p, torch.float32),
            host(self.min_p, torch.float32),
            seeds,
            masks,
            mask_index,
            offsets,
            ids,
            values,
        )
