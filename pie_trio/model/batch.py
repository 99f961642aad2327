"""Turning a list of `Forward` calls into the flat tensors of one ragged forward pass.

All calls' tokens are concatenated into one token axis (`rows`), so projections and the MLP run
once over the whole batch. Attention is the only per-sequence step; it is planned here, once per
forward, into groups that every layer then reuses:

- sequences with a short query block (a decode step, a few speculative tokens) attend in
  *decode groups*, each padded to one `[batch, queries, length]` attention; sequences of very
  different context lengths go to different groups, so that little of the work is padding;
- each longer query block (a prefill chunk) is its own *prefill group*.

The KV layout follows `pie_trio.model.calls`: a context is the concatenation of its pages,
the last one filled to `last_page_len` after this call's tokens are written into its last slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pie_trio.model.calls import Forward
from pie_trio.model.kv_cache import KvCache

# Query blocks up to this long are batched together (padded); longer ones attend on their own.
DECODE_QUERY_LIMIT = 8
# What one more padded attention group costs, in context pages of one sequence: its per-layer
# launch overhead equals gathering and attending about this many pages on CPU.
GROUP_COST_PAGES = 48


@dataclass
class AttentionGroup:
    """The sequences that attend together, and everything a layer needs to do it."""

    rows: slice | torch.Tensor  # their query rows in the batch: a slice, or [batch * queries]
    batch: int
    queries: int
    slots: torch.Tensor | None  # context slot ids [batch, length], None when `span` is given
    span: tuple[int, int] | None  # one sequence whose context is the slot range [start, end)
    mask: torch.Tensor | None  # bool [batch, queries, length], True = attend
    causal: bool  # no mask: the block is the whole context, attend causally
    valid: torch.Tensor | None  # rows of the padded [batch * queries] block that are real


@dataclass
class ForwardBatch:
    num_rows: int
    token_ids: torch.Tensor | None  # [rows] when every call gives tokens
    input_tokens: tuple[torch.Tensor, torch.Tensor] | None  # (rows, ids) of token inputs
    input_slots: tuple[torch.Tensor, torch.Tensor] | None  # (rows, embedding slot ids)
    positions: torch.Tensor  # [rows]
    write_slots: torch.Tensor  # [rows], where each row's K/V goes
    groups: list[AttentionGroup]
    output_rows: torch.Tensor  # [outputs], rows whose logits are wanted, in call order


def context_length(call: Forward, page_size: int) -> int:
    return (len(call.kv_pages) - 1) * page_size + call.last_page_len


def num_inputs(call: Forward) -> int:
    return len(call.tokens if call.tokens is not None else call.embed_slots or ())


def expand_brle(runs: list[int]) -> np.ndarray:
    """A BRLE mask (alternating attend/skip run lengths, attend first) as a bool row."""
    values = np.zeros(len(runs), dtype=bool)
    values[::2] = True
    return np.repeat(values, runs)


def build_batch(calls: list[Forward], kv: KvCache) -> ForwardBatch:
    """Plan one forward over `calls` (already checked) on the pool `kv`.

    The slots this forward writes lose their masked flag first (they are about to hold fresh
    K/V), then attention masks are planned from the pool's remaining flags.
    """
    page_size = kv.page_size
    device = kv.masked.device
    starts: list[int] = []
    positions: list[int] = []
    write_slots: list[int] = []
    token_rows: list[int] = []
    token_ids: list[int] = []
    slot_rows: list[int] = []
    slot_ids: list[int] = []
    output_rows: list[int] = []
    row = 0
    for call in calls:
        n = num_inputs(call)
        ctx = context_length(call, page_size)
        starts.append(row)
        positions.extend(call.positions)
        pages = call.kv_pages
        write_slots.extend(
            pages[j // page_size] * page_size + j % page_size for j in range(ctx - n, ctx)
        )
        if call.tokens is not None:
            token_rows.extend(range(row, row + n))
            token_ids.extend(call.tokens)
        else:
            slot_rows.extend(range(row, row + n))
            slot_ids.extend(call.embed_slots or ())
        output_rows.extend(row + i for i in call.output_indices)
        row += n

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    all_tokens = not slot_rows
    write_slots_tensor = as_tensor(write_slots)
    kv.clear_masked(write_slots_tensor)
    return ForwardBatch(
        num_rows=row,
        token_ids=as_tensor(token_ids) if all_tokens else None,
        input_tokens=None if all_tokens else (as_tensor(token_rows), as_tensor(token_ids)),
        input_slots=None if all_tokens else (as_tensor(slot_rows), as_tensor(slot_ids)),
        positions=as_tensor(positions),
        write_slots=write_slots_tensor,
        groups=_plan_groups(calls, starts, page_size, kv.masked if kv.any_masked else None, device),
        output_rows=as_tensor(output_rows),
    )


def _plan_groups(
    calls: list[Forward],
    starts: list[int],
    page_size: int,
    masked: torch.Tensor | None,
    device: torch.device,
) -> list[AttentionGroup]:
    short = [i for i, c in enumerate(calls) if num_inputs(c) <= DECODE_QUERY_LIMIT]
    long = [i for i, c in enumerate(calls) if num_inputs(c) > DECODE_QUERY_LIMIT]
    groups = [_prefill_group(calls[i], starts[i], page_size, masked, device) for i in long]
    pages = [len(calls[i].kv_pages) for i in short]
    for members in split_by_length([short[i] for i in _argsort(pages)], sorted(pages)):
        groups.append(
            _decode_group(
                [calls[i] for i in members],
                [starts[i] for i in members],
                page_size,
                masked,
                device,
            )
        )
    return groups


def _argsort(values: list[int]) -> list[int]:
    return sorted(range(len(values)), key=values.__getitem__)


def split_by_length(members: list[int], pages: list[int]) -> list[list[int]]:
    """Split decode sequences, sorted by context length in pages, into padded groups.

    Every member of a group is padded to the group's longest context, so one group over very
    different lengths gathers and attends mostly padding; each extra group costs a fixed few
    dozen small ops per layer. An exact dynamic program over the distinct lengths minimises
    `sum(members * longest) + GROUP_COST_PAGES * groups`.
    """
    if not members:
        return []
    lengths = sorted(set(pages))
    count_upto = [0]
    for length in lengths:
        count_upto.append(count_upto[-1] + pages.count(length))
    # best[j]: the cheapest split of the sequences with the j shortest distinct lengths.
    best = [0.0] + [float("inf")] * len(lengths)
    cut = [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        for i in range(j):
            cost = best[i] + (count_upto[j] - count_upto[i]) * lengths[j - 1] + GROUP_COST_PAGES
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(lengths)
    while j > 0:
        bounds.append((count_upto[cut[j]], count_upto[j]))
        j = cut[j]
    return [members[a:b] for a, b in reversed(bounds)]


def _context_span(call: Forward, page_size: int) -> tuple[int, int] | None:
    """The slot range of a context whose pages are consecutive in the pool, else None."""
    first = call.kv_pages[0]
    if any(page != first + i for i, page in enumerate(call.kv_pages)):
        return None
    start = first * page_size
    return start, start + context_length(call, page_size)


def _context_slots(
    calls: list[Forward], page_size: int, length: int, device: torch.device
) -> torch.Tensor:
    """Slot ids `[batch, length]` of each context, padded with slots of page 0."""
    width = max(len(c.kv_pages) for c in calls)
    table = torch.tensor(
        [c.kv_pages + [0] * (width - len(c.kv_pages)) for c in calls],
        dtype=torch.long,
        device=device,
    )
    offsets = torch.arange(page_size, dtype=torch.long, device=device)
    slots = (table.unsqueeze(-1) * page_size + offsets).view(len(calls), width * page_size)
    return slots[:, :length]


def _custom_masks(call: Forward, ctx: int) -> np.ndarray | None:
    """The call's BRLE masks as bool rows `[queries, ctx]`, or None when it has none."""
    if call.masks is None:
        return None
    rows = np.zeros((len(call.masks), ctx), dtype=bool)
    for i, runs in enumerate(call.masks):
        row = expand_brle(runs)
        rows[i, : len(row)] = row
    return rows


def _prefill_group(
    call: Forward,
    start: int,
    page_size: int,
    masked: torch.Tensor | None,
    device: torch.device,
) -> AttentionGroup:
    n = num_inputs(call)
    ctx = context_length(call, page_size)
    span = _context_span(call, page_size)
    slots = None if span else _context_slots([call], page_size, ctx, device)
    custom = _custom_masks(call, ctx)
    mask = None
    if custom is not None:
        mask = torch.from_numpy(custom).to(device)
    elif n < ctx:  # a chunk after earlier context: causal, aligned to the end
        keys = torch.arange(ctx, device=device)
        mask = keys.unsqueeze(0) <= torch.arange(ctx - n, ctx, device=device).unsqueeze(1)
    if masked is not None:
        if span:
            context = masked[span[0] : span[1]]
        else:
            assert slots is not None  # a context without a span is gathered by slots
            context = masked[slots[0]]
        if bool(context.any()):
            if mask is None:
                mask = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
            mask = mask & ~context
    return AttentionGroup(
        rows=slice(start, start + n),
        batch=1,
        queries=n,
        slots=slots,
        span=span,
        mask=mask,
        causal=mask is None,
        valid=None,
    )


def _decode_group(
    calls: list[Forward],
    starts: list[int],
    page_size: int,
    masked: torch.Tensor | None,
    device: torch.device,
) -> AttentionGroup:
    counts = [num_inputs(c) for c in calls]
    contexts = [context_length(c, page_size) for c in calls]
    batch, queries, length = len(calls), max(counts), max(contexts)
    span = _context_span(calls[0], page_size) if batch == 1 else None
    slots = None if span else _context_slots(calls, page_size, length, device)

    mask = None
    needs_mask = queries > 1 or len(set(contexts)) > 1 or any(c.masks is not None for c in calls)
    context_masked = None
    if masked is not None:
        context_masked = masked[span[0] : span[1]].unsqueeze(0) if span else masked[slots]
        needs_mask = needs_mask or bool(context_masked.any())
    if needs_mask:
        mask = torch.from_numpy(_decode_mask(calls, counts, contexts, queries, length)).to(device)
        if context_masked is not None:
            mask &= ~context_masked.unsqueeze(1)

    # Query rows of the padded [batch, queries] block, and which of them are real.
    in_order = all(n == queries for n in counts) and starts == list(
        range(starts[0], starts[0] + batch * queries, queries)
    )
    if in_order:
        rows: slice | torch.Tensor = slice(starts[0], starts[0] + batch * queries)
        valid = None
    else:
        index = [
            start + min(i, n - 1)
            for start, n in zip(starts, counts, strict=True)
            for i in range(queries)
        ]
        rows = torch.tensor(index, dtype=torch.long, device=device)
        valid = None
        if any(n < queries for n in counts):
            real = [i < n for n in counts for i in range(queries)]
            valid = torch.tensor(real, dtype=torch.bool, device=device)
    return AttentionGroup(
        rows=rows,
        batch=batch,
        queries=queries,
        slots=slots,
        span=span,
        mask=mask,
        causal=False,
        valid=valid,
    )


def _decode_mask(
    calls: list[Forward], counts: list[int], contexts: list[int], queries: int, length: int
) -> np.ndarray:
    """Causal (or custom) masks `[batch, queries, length]`; padding attends nothing."""
    mask = np.zeros((len(calls), queries, length), dtype=bool)
    keys = np.arange(length)
    for b, (call, n, ctx) in enumerate(zip(calls, counts, contexts, strict=True)):
        custom = _custom_masks(call, ctx)
        if custom is not None:
            mask[b, :n, :ctx] = custom
        else:
            last_key = np.arange(ctx - n, ctx)
            mask[b, :n] = keys[None, :] <= last_key[:, None]
    return mask
