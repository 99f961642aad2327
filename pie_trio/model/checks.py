"""Validation of calls against the model and its pools, before they reach a batch.

A bad call must fail alone, with a message its author can act on, and never take a whole batch
down: so everything the forward pass would trip over is checked here first. This is the one
owner of the *physical* ranges — page and slot ids against the pools, page fill and offsets
against the page size, positions, token ids, mask lengths, output indices, sampler values,
vocabulary masks — for every caller of the executor. Page *ownership* is the executor's concern;
a guest's field shapes and virtual ids are the control layer's (`control/inference.py`), which
passes range errors from here back to the guest prefixed with its op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pie_trio.model.calls import CallError, CopyKv, Embed, Forward, MaskKv, Sampler


@dataclass(frozen=True)
class ModelLimits:
    num_pages: int
    page_size: int
    num_slots: int
    vocab_size: int
    max_position: int


def check_call(call: Any, limits: ModelLimits) -> None:
    """Raise `CallError` if `call` cannot run; calls with no model work pass."""
    if isinstance(call, Forward):
        _check_forward(call, limits)
    elif isinstance(call, Embed):
        _check_embed(call, limits)
    elif isinstance(call, CopyKv):
        _check_copy(call, limits)
    elif isinstance(call, MaskKv):
        _check_mask(call, limits)


# Tuples, not `list | tuple` unions: a union is built anew at every evaluation, and these run
# for every call of every tick.
_SEQUENCE = (list, tuple)
_NUMBER = (int, float)
_BINARY = (bytes, bytearray)


def _ints(name: str, values: Any) -> Sequence[int]:
    if not isinstance(values, _SEQUENCE) or not all(
        type(v) is int or (isinstance(v, int) and not isinstance(v, bool)) for v in values
    ):
        raise CallError(f"{name} must be a list of integers")
    return values


def _in_range(name: str, values: Sequence[int], limit: int, what: str) -> None:
    if values and (min(values) < 0 or max(values) >= limit):
        bad = [v for v in values if not 0 <= v < limit]
        raise CallError(f"{name} {bad[:5]} out of range: {what} are 0..{limit - 1}")


def _check_forward(call: Forward, limits: ModelLimits) -> None:
    pages = _ints("kv_pages", call.kv_pages)
    if not pages:
        raise CallError("forward needs at least one KV page")
    _in_range("kv_pages", pages, limits.num_pages, f"the pool's {limits.num_pages} pages")
    if not isinstance(call.last_page_len, int) or not (1 <= call.last_page_len <= limits.page_size):
        raise CallError(
            f"last_page_len {call.last_page_len!r} must be 1..{limits.page_size} (the page size): "
            "it is the fill of the last page after this call's tokens are written"
        )
    n = _check_inputs(call, limits)
    context = (len(pages) - 1) * limits.page_size + call.last_page_len
    if context < n:
        raise CallError(
            f"context of {context} slots ({len(pages)} pages, last filled to "
            f"{call.last_page_len}) is shorter than the {n} input tokens it must hold"
        )
    positions = _ints("positions", call.positions)
    if len(positions) != n:
        raise CallError(f"{len(positions)} positions for {n} input tokens; give one per token")
    _in_range("positions", positions, limits.max_position, "positions")
    if call.masks is not None:
        _check_masks(call.masks, n, context)
    outputs = _ints("output_indices", call.output_indices)
    _in_range("output_indices", outputs, n, f"indices into the {n} input tokens")
    if not isinstance(call.top_k, int) or call.top_k < 0:
        raise CallError(f"top_k must be a non-negative integer, got {call.top_k!r}")
    if call.sampler is not None:
        check_sampler(call.sampler)
    if call.vocab_mask is not None:
        _check_vocab_mask(call.vocab_mask, limits.vocab_size)
    if call.logit_bias is not None:
        _check_logit_bias(call.logit_bias, limits.vocab_size)


def _check_inputs(call: Forward, limits: ModelLimits) -> int:
    """Validate tokens or embedding slots; returns the number of input tokens."""
    if (call.tokens is None) == (call.embed_slots is None):
        raise CallError("give exactly one of tokens or embed_slots")
    if call.tokens is not None:
        tokens = _ints("tokens", call.tokens)
        _in_range("tokens", tokens, limits.vocab_size, "token ids")
    else:
        tokens = _ints("embed_slots", call.embed_slots)
        _in_range("embed_slots", tokens, limits.num_slots, "embedding slots")
    if not tokens:
        raise CallError("forward has no input tokens")
    return len(tokens)


def _check_masks(masks: Any, n: int, context: int) -> None:
    if not isinstance(masks, _SEQUENCE) or len(masks) != n:
        raise CallError(f"masks must hold one BRLE mask per input token ({n})")
    for i, runs in enumerate(masks):
        runs = _ints(f"masks[{i}]", runs)
        if any(r < 0 for r in runs):
            raise CallError(f"masks[{i}] has a negative run length")
        expected = context - n + i + 1
        if sum(runs) != expected:
            raise CallError(
                f"masks[{i}] covers {sum(runs)} slots, but input token {i} sees {expected} "
                "(its causal context: every slot up to and including its own)"
            )


def check_sampler(sampler: Any) -> None:
    if not isinstance(sampler, Sampler):
        raise CallError("sampler must be a Sampler")
    temperature = sampler.temperature
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise CallError(f"sampler temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(sampler.top_k, int) or sampler.top_k < 0:
        raise CallError(f"sampler top_k must be >= 0 (0 = off), got {sampler.top_k!r}")
    if not _is_number(sampler.top_p) or not 0 < sampler.top_p <= 1:
        raise CallError(f"sampler top_p must be in (0, 1] (1 = off), got {sampler.top_p!r}")
    if not _is_number(sampler.min_p) or not 0 <= sampler.min_p < 1:
        raise CallError(f"sampler min_p must be in [0, 1) (0 = off), got {sampler.min_p!r}")
    if sampler.seed is not None and not isinstance(sampler.seed, int):
        raise CallError(f"sampler seed must be an integer or absent, got {sampler.seed!r}")
    if sampler.seed is not None and not 0 <= sampler.seed < 2**63:
        raise CallError(f"sampler seed must be in 0..2**63-1, got {sampler.seed!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _check_vocab_mask(mask: Any, vocab_size: int) -> None:
    expected = (vocab_size + 7) // 8
    if not isinstance(mask, _BINARY) or len(mask) != expected:
        size = len(mask) if isinstance(mask, _BINARY) else type(mask).__name__
        raise CallError(
            f"vocab_mask must be {expected} bytes (a packed bit per token of {vocab_size}), "
            f"got {size}"
        )
    if not any(mask):
        raise CallError("vocab_mask allows no token at all")


def _check_logit_bias(bias: Any, vocab_size: int) -> None:
    if not isinstance(bias, dict):
        raise CallError("logit_bias must map token ids to numbers")
    ids = _ints("logit_bias token ids", list(bias))
    _in_range("logit_bias token ids", ids, vocab_size, "token ids")
    if not all(_is_number(v) and not math.isnan(v) for v in bias.values()):
        raise CallError("logit_bias values must be numbers")


def _check_embed(call: Embed, limits: ModelLimits) -> None:
    tokens = _ints("tokens", call.tokens)
    slots = _ints("slots", call.slots)
    if not tokens:
        raise CallError("embed has no tokens")
    if len(tokens) != len(slots):
        raise CallError(f"embed got {len(tokens)} tokens for {len(slots)} slots; give one each")
    _in_range("tokens", tokens, limits.vocab_size, "token ids")
    _in_range("slots", slots, limits.num_slots, f"the pool's {limits.num_slots} embedding slots")


def _check_copy(call: CopyKv, limits: ModelLimits) -> None:
    pages = _ints("pages", [call.src_page, call.dst_page])
    _in_range("pages", pages, limits.num_pages, f"the pool's {limits.num_pages} pages")
    _ints("offsets and count", [call.src_offset, call.dst_offset, call.count])
    if call.count < 0 or call.src_offset < 0 or call.dst_offset < 0:
        raise CallError("copy_kv offsets and count must be >= 0")
    for name, offset in (("src", call.src_offset), ("dst", call.dst_offset)):
        if offset + call.count > limits.page_size:
            raise CallError(
                f"copy_kv {name}_offset {offset} + count {call.count} runs past the end of a "
                f"page of {limits.page_size} slots"
            )


def _check_mask(call: MaskKv, limits: ModelLimits) -> None:
    _in_range("page", _ints("page", [call.page]), limits.num_pages, "pages")
    slots = _ints("slots", call.slots)
    _in_range("slots", slots, limits.page_size, f"offsets in a page of {limits.page_size}")
    if not isinstance(call.masked, bool):
        raise CallError("mask_kv masked must be true or false")
