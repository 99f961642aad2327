"""CUDA graphs for decode steps: one captured launch sequence per padded batch size.

A plain decode step (every call one token, one output, no BRLE mask, no masked slot in the
pool) has a shape fixed by its batch size alone, so it can be captured once and replayed: the
step then costs one graph launch instead of a few hundred kernel launches driven from Python.
The batch is padded up to the next captured size (`DECODE_SIZES`); padding rows attend nothing
(length 0) and store nothing (slot -1). Anything else (prefill chunks, masks, more pages than
the captured page table holds, a batch beyond the largest size) returns None from
`DecodeGraphs.logits`, and the runner takes the ordinary path.

Capture and replay go through a `GraphBackend`: `TorchGraphBackend` on CUDA, and for tests on
any device `EagerBackend`, which replays by re-running the step, so the bookkeeping (padding,
static buffers, one capture per size, fallbacks) is checked without a GPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pie_trio.kernels import torch_ops as ops
from pie_trio.kernels.dispatch import Kernels, PagedContext
from pie_trio.model.calls import Forward
from pie_trio.model.kv_cache import KvCache
from pie_trio.model.llama import LlamaModel

DECODE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# Longest context a captured step serves, in tokens; its page table is sized from it.
DEFAULT_MAX_CONTEXT = 8192


def padded_size(count: int, sizes: tuple[int, ...] = DECODE_SIZES) -> int | None:
    """The smallest captured size holding `count` sequences, or None when none does."""
    if count < 1:
        return None
    at = bisect.bisect_left(sizes, count)
    return sizes[at] if at < len(sizes) else None


class Replay(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    def capture(self, step: Callable[[], None]) -> Replay:
        """Record `step` (which reads and writes only static buffers) for later replays."""
        ...


class _EagerReplay:
    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step

    def replay(self) -> None:
        self.step()


class EagerBackend:
    """"Captures" by keeping the step and replays by running it: the graphs' bookkeeping on
    any device, with the very step a CUDA graph would record."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, step: Callable[[], None]) -> Replay:
        self.captures += 1
        step()  # as a CUDA capture would, run it once (it may allocate then, never later)
        return _EagerReplay(step)


class TorchGraphBackend:
    """`torch.cuda.CUDAGraph`s sharing one memory pool, warmed up on a side stream first (the
    kernels compile and allocate there, outside the capture)."""

    WARMUP_RUNS = 2

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, step: Callable[[], None]) -> Replay:
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # untyped in torch's stubs
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph


@dataclass
class DecodeInputs:
    """The static buffers of one captured size: filled before each replay, read by the step."""

    token_ids: torch.Tensor  # [size] long
    positions: torch.Tensor  # [size] long
    write_slots: torch.Tensor  # [size] long; -1 for padding rows
    page_table: torch.Tensor  # [size, max_pages] long
    lengths: torch.Tensor  # [size] int32; 0 for padding rows
    logits: torch.Tensor | None = None  # [size, vocab] fp32, written by the step

    @classmethod
    def allocate(cls, size: int, max_pages: int, device: torch.device) -> DecodeInputs:
        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(longs(size), longs(size), longs(size) - 1, longs(size, max_pages),
                   torch.zeros(size, dtype=torch.int32, device=device))  # fmt: skip

    def fill(self, calls: list[Forward], page_size: int) -> None:
        """Copy the calls' step into the buffers (one host-to-device copy per buffer)."""
        size, width = self.page_table.shape
        tokens, positions, slots = [0] * size, [0] * size, [-1] * size
        table, lengths = [[0] * width for _ in range(size)], [0] * size
        for i, call in enumerate(calls):
            assert call.tokens is not None
            length = (len(call.kv_pages) - 1) * page_size + call.last_page_len
            tokens[i], positions[i], lengths[i] = call.tokens[0], call.positions[0], length
            last = length - 1  # the new token's slot: the context's last
            slots[i] = call.kv_pages[last // page_size] * page_size + last % page_size
            table[i][: len(call.kv_pages)] = call.kv_pages
        for buffer, values in ((self.token_ids, tokens), (self.positions, positions),
                               (self.write_slots, slots), (self.page_table, table),
                               (self.lengths, lengths)):  # fmt: skip
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)


def decode_step(model: LlamaModel, kv: KvCache, kernels: Kernels, inputs: DecodeInputs) -> None:
    """One decode step over static buffers, every layer through `kernels`' fused ops; writes
    fp32 logits of every row (padding included) into `inputs.logits`."""
    cfg = model.config
    rows = inputs.token_ids.shape[0]
    width = inputs.page_table.shape[1] * kv.page_size
    context = PagedContext(inputs.page_table, kv.page_size, 0, inputs.lengths, width)
    hidden = model.embed(inputs.token_ids)
    x = ops.rms_norm(hidden, model.layers[0].input_norm, cfg.rms_norm_eps)
    for i, layer in enumerate(model.layers):
        q = kernels.rotary_kv_write(
            ops.linear(x, layer.qkv), model.rope_cos, model.rope_sin, inputs.positions,
            inputs.write_slots, kv.k[i], kv.v[i], cfg.num_heads, cfg.num_kv_heads,
        )  # fmt: skip
        attn = kernels.paged_attention(
            q, kv.k[i], kv.v[i], context, rows, 1, None, False, model.scale
        )
        delta = ops.linear(attn.reshape(rows, cfg.num_heads * cfg.head_dim), layer.out)
        hidden, x = kernels.add_rms_norm(hidden, delta, layer.post_norm, cfg.rms_norm_eps)
        delta = ops.linear(ops.silu_mul(ops.linear(x, layer.gate_up)), layer.down)
        if i + 1 < len(model.layers):
            next_norm = model.layers[i + 1].input_norm
            hidden, x = kernels.add_rms_norm(hidden, delta, next_norm, cfg.rms_norm_eps)
        else:
            hidden = hidden + delta
    logits = model.logits(hidden)
    if inputs.logits is None:
        inputs.logits = logits
    else:
        inputs.logits.copy_(logits)


class DecodeGraphs:
    """Captured decode steps keyed by padded batch size, captured on first use of a size."""

    def __init__(
        self,
        model: LlamaModel,
        kv: KvCache,
        kernels: Kernels,
        backend: GraphBackend,
        sizes: tuple[int, ...] = DECODE_SIZES,
        max_context: int = DEFAULT_MAX_CONTEXT,
    ) -> None:
        self.model, self.kv, self.kernels, self.backend = model, kv, kernels, backend
        self.sizes = sizes
        self.max_pages = -(-min(max_context, model.config.max_position) // kv.page_size)
        self.graphs: dict[int, tuple[DecodeInputs, Replay]] = {}
        self.replays = 0

    @classmethod
    def for_device(cls, model: LlamaModel, kv: KvCache, kernels: Kernels) -> DecodeGraphs | None:
        """Graphs on CUDA with the raw kernels (the torch path has no paged attention to
        capture); None elsewhere."""
        if model.device.type != "cuda" or not kernels.cuda:
            return None
        return cls(model, kv, kernels, TorchGraphBackend())

    def eligible(self, calls: list[Forward]) -> bool:
        """Whether the calls form a plain decode step a captured graph can run."""
        if self.kv.any_masked or padded_size(len(calls), self.sizes) is None:
            return False
        return all(
            call.tokens is not None and len(call.tokens) == 1 and call.masks is None
            and call.output_indices == [0] and len(call.kv_pages) <= self.max_pages
            for call in calls
        )  # fmt: skip

    def logits(self, calls: list[Forward]) -> torch.Tensor | None:
        """fp32 logits `[calls, vocab]` of a decode step by graph replay, or None when the
        calls do not fit a captured shape (the caller then runs the ordinary forward)."""
        if not self.eligible(calls):
            return None
        size = padded_size(len(calls), self.sizes)
        assert size is not None
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        inputs, graph = self.graphs[size]
        inputs.fill(calls, self.kv.page_size)
        graph.replay()
        self.replays += 1
        assert inputs.logits is not None
        return inputs.logits[: len(calls)].clone()

    def _capture(self, size: int) -> tuple[DecodeInputs, Replay]:
        inputs = DecodeInputs.allocate(size, self.max_pages, self.model.device)
        # Capture with padding only (nothing stored, nothing attended): the pool is untouched.
        graph = self.backend.capture(lambda: decode_step(self.model, self.kv, self.kernels, inputs))
        return inputs, graph
