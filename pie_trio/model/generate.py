"""Plain generation straight on a `ModelRunner`, without executor, scheduler or inferlets.

For tests, benchmarks and one-off scripts that own a runner outright: it hands out the pool's
pages itself, so never use it on a runner an executor is serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pie_trio.model.calls import Forward, ForwardResult, Sampler
from pie_trio.model.runner import ModelRunner


@dataclass
class _Sequence:
    tokens: list[int]  # everything in the context so far, prompt included
    pages: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    done: bool = False


def generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampler: Sampler | None = None,
    stop_tokens: Sequence[int] | None = None,
) -> list[list[int]]:
    """Continue every prompt (token ids) together; returns each one's new tokens.

    All prompts are prefilled in one ragged forward, then decoded one token per step in one
    batch; a sequence stops at a stop token (not included) or after `max_new_tokens`.
    """
    sampler = sampler or Sampler()
    stops = set(runner.info.stop_tokens if stop_tokens is None else stop_tokens)
    page_size = runner.info.page_size
    free_pages = list(range(runner.info.num_pages - 1, -1, -1))
    seqs = [_Sequence(list(p)) for p in prompts]
    if any(not s.tokens for s in seqs):
        raise ValueError("every prompt needs at least one token")

    def step(active: list[_Sequence], inputs: list[list[int]]) -> list[int]:
        calls = []
        for seq, new in zip(active, inputs, strict=True):
            needed = -(-len(seq.tokens) // page_size)
            while len(seq.pages) < needed:
                if not free_pages:
                    raise RuntimeError("the KV pool is full")
                seq.pages.append(free_pages.pop())
            start = len(seq.tokens) - len(new)
            calls.append(
                Forward(
                    owner="generate",
                    kv_pages=list(seq.pages),
                    last_page_len=len(seq.tokens) - (len(seq.pages) - 1) * page_size,
                    positions=list(range(start, len(seq.tokens))),
                    tokens=list(new),
                    output_indices=[len(new) - 1],
                    sampler=sampler,
                )
            )
        return [_sampled(result) for result in runner.forward(calls)]

    active, inputs = seqs, [list(s.tokens) for s in seqs]
    for _ in range(max_new_tokens):
        if not active:
            break
        for seq, token in zip(active, step(active, inputs), strict=True):
            if token in stops:
                seq.done = True
            else:
                seq.generated.append(token)
                seq.tokens.append(token)
        for seq in active:
            if seq.done or len(seq.generated) >= max_new_tokens:
                free_pages.extend(seq.pages)
                seq.done = True
        active = [s for s in active if not s.done]
        inputs = [[s.tokens[-1]] for s in active]
    return [s.generated for s in seqs]


def _sampled(result: ForwardResult) -> int:
    assert result.tokens, "every call here has a sampler, so its result has a token"
    return result.tokens[0]
