"""Concurrent generations on the real model (bf16) through one executor.

In bf16, products of different shapes (a batch of eight prompts, or one longer prompt) round
differently, and near-ties between the two best tokens can break either way. The check is
therefore "every token a concurrent run produced is the token a lone run picks from that same
prefix, unless the two best are within bf16 noise of each other": one teacher-forced lone
forward per sequence scores every step.
"""

from __future__ import annotations

import math

import pytest
import trio

from pie_trio.executor.direct import complete
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import AllocPages, CallError, Forward, FreePages, Sampler

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2+2?",
    "Who wrote Hamlet?",
    "What is the largest planet?",
    "Describe a cat in one sentence.",
    "What is water made of?",
    "Say hello in Spanish.",
]
MAX_TOKENS = 12
# Two tokens whose log-probabilities differ by less than this are a tie under bf16 rounding
# (measured: different batch shapes move this model's logits by up to about 0.15).
TIE = 0.3


def lone_choice(dist, token: int) -> bool:
    """Whether a lone run could pick `token`: it is the best, or tied with the best."""
    ids, probs = dist
    return token in ids and math.log(probs[0]) - math.log(probs[ids.index(token)]) < TIE


async def lone_dists(executor, prompt: list[int], generated: list[int]):
    """Top-5 next-token distributions at every generated step, from one lone forward."""
    context = prompt + generated
    page = executor.info.page_size
    pages = await executor.submit(AllocPages("check", -(-len(context) // page)))
    try:
        result = await executor.submit(Forward(
            owner="check", kv_pages=pages, last_page_len=len(context) - (len(pages) - 1) * page,
            positions=list(range(len(context))), tokens=context,
            output_indices=list(range(len(prompt) - 1, len(context))), top_k=5,
        ))
    finally:
        await executor.submit(FreePages("check", pages))
    return result.dists


@pytest.mark.slow
async def test_concurrent_chat_generations_match_lone_choices(real_runner):
    tokenizer = real_runner.tokenizer
    prompts = [tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": q}]))
               for q in QUESTIONS]
    executor = Executor(real_runner)
    results: list = [None] * len(prompts)
    bad: list = []

    async def one(i):
        results[i] = await complete(executor, prompts[i], max_tokens=MAX_TOKENS, owner=f"q{i}")

    async def nonsense():
        with pytest.raises(CallError, match="top_p"):
            await complete(executor, prompts[0], max_tokens=4, owner="bad",
                           sampler=Sampler(temperature=0.7, top_p=0.0))
        bad.append(True)

    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        async with trio.open_nursery() as callers:
            for i in range(len(prompts)):
                callers.start_soon(one, i)
                if i == len(prompts) // 2:
                    callers.start_soon(nonsense)
        assert max(executor.stats.forward_calls) >= 4, executor.stats.forward_calls
        assert bad and executor.pages.num_used == 0

        stop_tokens = set(real_runner.info.stop_tokens)
        for prompt, generated in zip(prompts, results, strict=True):
            dists = await lone_dists(executor, prompt, generated)
            for step, token in enumerate(generated):
                assert lone_choice(dists[step], token), (tokenizer.decode(generated), step)
            # it stopped where a lone run stops: at a stop token, or at the limit
            if len(generated) < MAX_TOKENS:
                assert any(lone_choice(dists[len(generated)], stop) for stop in stop_tokens)
        nursery.cancel_scope.cancel()
    assert tokenizer.decode(results[0]) == "The capital of France is Paris."
