"""From logits to what a `Forward` asked for: top-k distributions and/or sampled tokens.

Per call, in order: the vocabulary mask (constrained decoding) and the logit bias shape the
logits; a top-k distribution is read from their softmax; a token is drawn with the call's
`Sampler` (greedy at temperature 0, else temperature → top-k → top-p → min-p), from the call's
own seeded generator when it gives a seed. Work that is the same for every row (softmax, argmax)
runs batched over all calls' rows.
"""

from __future__ import annotations

import numpy as np
import torch

from pie_trio.model.calls import Forward, ForwardResult, Sampler


def unpack_vocab_mask(packed: bytes, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Bool `[vocab_size]`: bit `t % 8` of byte `t // 8` says whether token t is allowed."""
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab_size].astype(bool)).to(device)


def shape_logits(logits: torch.Tensor, call: Forward) -> None:
    """Apply the call's vocabulary mask and logit bias to its rows, in place."""
    if call.vocab_mask is not None:
        allowed = unpack_vocab_mask(call.vocab_mask, logits.shape[-1], logits.device)
        logits.masked_fill_(~allowed, float("-inf"))
    if call.logit_bias:
        ids = torch.tensor(list(call.logit_bias), dtype=torch.long, device=logits.device)
        bias = torch.tensor(list(call.logit_bias.values()), device=logits.device)
        logits[:, ids] += bias


def sample(logits: torch.Tensor, sampler: Sampler, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of `logits` `[rows, vocab]`."""
    if sampler.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampler.temperature
    if 0 < sampler.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampler.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampler.top_p < 1.0:
        probs = _top_p(probs, sampler.top_p)
    if sampler.min_p > 0.0:
        floor = sampler.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (at least one)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def top_k_dists(probs: torch.Tensor, k: int) -> list[tuple[list[int], list[float]]]:
    values, ids = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def results_for(
    logits: torch.Tensor,
    calls: list[Forward],
    outputs_per_call: list[int],
    default_generator: torch.Generator,
) -> list[ForwardResult]:
    """Split the batch's output logits `[outputs, vocab]` back into per-call results."""
    spans, start = [], 0
    for count in outputs_per_call:
        spans.append(slice(start, start + count))
        start += count
    for call, span in zip(calls, spans, strict=True):
        if call.vocab_mask is not None or call.logit_bias:
            shape_logits(logits[span], call)

    wants_dists = [c.top_k > 0 for c in calls]
    probs = torch.softmax(logits, dim=-1) if any(wants_dists) else None
    greedy = (
        logits.argmax(dim=-1).tolist()
        if any(c.sampler is not None and c.sampler.temperature == 0 for c in calls)
        else None
    )

    results = []
    for call, span in zip(calls, spans, strict=True):
        result = ForwardResult()
        if call.top_k > 0:
            assert probs is not None  # computed above whenever a call wants a distribution
            result.dists = top_k_dists(probs[span], call.top_k)
        if call.sampler is not None:
            if call.sampler.temperature == 0:
                assert greedy is not None  # computed above whenever a call samples greedily
                result.tokens = greedy[span]
            else:
                generator = _generator(call.sampler, logits.device, default_generator)
                result.tokens = sample(logits[span], call.sampler, generator).tolist()
        results.append(result)
    return results


def _generator(sampler: Sampler, device: torch.device, default: torch.Generator) -> torch.Generator:
    if sampler.seed is None:
        return default
    return torch.Generator(device=device).manual_seed(sampler.seed)
