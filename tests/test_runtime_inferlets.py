"""The runtime running the built-in Rust inferlets: token-for-token equality with direct
generation on the real model, a hundred instances at once with their forwards coalesced, forks
and beam search sharing KV pages (in a pool too small for unshared copies) with the results of
an unshared host-side reference, and adversarial guests beside normal inferlets."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import trio
from test_runtime_support import finish, running_stack

from pie_trio.executor.direct import complete
from pie_trio.model.calls import AllocPages, Forward, FreePages, Sampler
from pie_trio.model.tiny import tiny_runner as make_tiny_runner
from pie_trio.runtime.sandbox import InstanceLimits, MiB

# About 210 tokens: 13 full KV pages of 16 and a partial one.
LONG_PROMPT = " ".join(f"Chapter {i}: the lighthouse keeper counted ships." for i in range(20))


def messages(outcome) -> list[str]:
    return [e["message"] for e in outcome.events if e["event"] == "message"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["Once upon a time", "The three primary colours are"])
async def test_text_completion_equals_direct_generation_on_the_real_model(dtype_runner, prompt):
    """What `pie-trio complete` prints (direct generation) is what the inferlet returns, in the
    default dtype and in bf16 and fp32 explicitly."""
    tokenizer = dtype_runner.tokenizer
    async with running_stack(dtype_runner) as stack:
        reference = await complete(stack.executor, tokenizer.encode(prompt), max_tokens=32,
                                   owner="reference")
        outcome = await finish(await stack.launch(
            "text-completion", "--prompt", prompt, "--max-tokens", 32))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert outcome.reason == "finished", outcome.detail
    assert outcome.return_value == tokenizer.decode(reference)
    assert "".join(messages(outcome)) == outcome.return_value
    if prompt == "Once upon a time":
        assert outcome.return_value.startswith(", the city of Nova Haven")


async def test_a_hundred_inferlets_at_once_are_batched_and_correct():
    runner = make_tiny_runner(num_pages=512)
    count, max_tokens = 120, 8
    prompts = [f"Story number {i} begins when" for i in range(count)]
    async with running_stack(runner) as stack:
        references: dict[int, list[int]] = {}
        outcomes: dict[int, object] = {}

        async def reference(i: int) -> None:
            references[i] = await complete(stack.executor, runner.tokenizer.encode(prompts[i]),
                                           max_tokens=max_tokens, owner=f"ref{i}",
                                           ignore_stop=True)

        async def inferlet(i: int) -> None:
            outcomes[i] = await finish(await stack.launch(
                "text-completion", "--prompt", prompts[i], "--max-tokens", max_tokens,
                "--ignore-eos"))

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(reference, i)
        before = dict(stack.executor.stats.forward_calls)
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(inferlet, i)
        batch_sizes = stack.executor.stats.forward_calls - Counter(before)
        assert stack.runtime.stats()["instances"] == 0
        assert stack.controller.stats()["pages_in_use"] == 0
    for i in range(count):
        assert outcomes[i].reason == "finished", outcomes[i].detail
        assert outcomes[i].return_value == runner.tokenizer.decode(references[i]), i
    # One forward per token and instance, coalesced: most of them in batches of many.
    assert sum(size * n for size, n in batch_sizes.items()) == count * max_tokens
    assert max(batch_sizes) >= 16
    assert sum(batch_sizes.values()) < count * max_tokens / 4


class PeakPages:
    """The most physical KV pages in use, sampled from the controller's stats while it runs."""

    def __init__(self, controller):
        self.controller = controller
        self.peak = 0

    async def watch(self) -> None:
        while True:
            self.peak = max(self.peak, self.controller.stats()["pages_in_use"])
            await trio.sleep(0)


async def run_watching_pages(stack, program: str, *args):
    peak = PeakPages(stack.controller)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peak.watch)
        outcome = await finish(await stack.launch(program, *args))
        nursery.cancel_scope.cancel()
    return outcome, peak.peak


def pages_for(runner, tokens: int) -> int:
    return math.ceil(tokens / runner.info.page_size)


SHARED_POOL = 32  # pages: enough for the forks sharing their prompt, not for copies of it


async def test_parallel_forks_share_pages_and_sample_like_unshared_generations():
    runner = make_tiny_runner(num_pages=SHARED_POOL)
    n, max_tokens, seed = 4, 8, 11
    prompt_tokens = runner.tokenizer.encode(LONG_PROMPT)
    unshared = n * pages_for(runner, len(prompt_tokens) + max_tokens)
    assert unshared > SHARED_POOL
    async with running_stack(runner) as stack:
        outcome, peak = await run_watching_pages(
            stack, "parallel-generation", "--prompt", LONG_PROMPT, "--n", n, "--max-tokens",
            max_tokens, "--temperature", 0.8, "--seed", seed, "--ignore-eos")
        assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
        # The same generations, one at a time, each with its own unshared pages.
        expected = []
        for i in range(n):
            sampler = Sampler(temperature=0.8, seed=seed + 1000 * i)
            tokens = await complete(stack.executor, prompt_tokens, max_tokens=max_tokens,
                                    owner="reference", sampler=sampler, ignore_stop=True)
            expected.append(runner.tokenizer.decode(tokens))
        assert stack.controller.stats()["pages_in_use"] == 0
    assert json.loads(outcome.return_value) == expected
    # The prompt's full pages are held once, not once per fork.
    full_prompt_pages = len(prompt_tokens) // runner.info.page_size
    assert full_prompt_pages < peak <= full_prompt_pages + 2 * n + 1 < unshared


async def test_beam_search_shares_pages_and_finds_the_unshared_reference_beam():
    runner = make_tiny_runner(num_pages=SHARED_POOL)
    width, max_tokens = 4, 6
    prompt_tokens = runner.tokenizer.encode(LONG_PROMPT)
    unshared = width * pages_for(runner, len(prompt_tokens) + max_tokens)
    assert unshared > SHARED_POOL
    async with running_stack(runner) as stack:
        outcome, peak = await run_watching_pages(
            stack, "beam-search", "--prompt", LONG_PROMPT, "--beam-width", width,
            "--max-tokens", max_tokens, "--ignore-eos")
        assert outcome.reason == "finished", outcome.text("stderr") or outcome.detail
        best_tokens, best_score = await reference_beam_search(  # --ignore-eos: no stops
            stack.executor, runner, prompt_tokens, width, max_tokens)
        assert stack.controller.stats()["pages_in_use"] == 0
    best = json.loads(messages(outcome)[-1])
    assert outcome.return_value == runner.tokenizer.decode(best_tokens)
    assert best["tokens"] == len(best_tokens)
    assert best["score"] == pytest.approx(best_score, abs=1e-3)
    full_prompt_pages = len(prompt_tokens) // runner.info.page_size
    assert full_prompt_pages < peak <= full_prompt_pages + 3 * width + 1 < unshared


async def reference_beam_search(executor, runner, prompt: list[int], width: int,
                                max_tokens: int, stops: frozenset[int] = frozenset()
                                ) -> tuple[list[int], float]:
    """The beam-search example's algorithm on the host, every beam recomputed from scratch in
    its own pages (nothing shared): the best hypothesis and its summed log-probability."""
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_tokens):
        if not beams or len(finished) >= width:
            break
        dists = [await _top_k(executor, runner, prompt + tokens, 2 * width)
                 for tokens, _ in beams]
        candidates = [(beams[b][1] + math.log(prob), b, token)
                      for b, (ids, probs) in enumerate(dists)
                      for token, prob in zip(ids, probs, strict=True) if prob > 0.0]
        candidates.sort(key=lambda c: c[0], reverse=True)  # stable, like Rust's sort_by
        chosen = []
        for rank, (score, b, token) in enumerate(candidates):
            if len(chosen) == width:
                break
            if token in stops:
                if rank < width:
                    finished.append((beams[b][0], score))
                continue
            chosen.append((score, b, token))
        beams = [(beams[b][0] + [token], score) for score, b, token in chosen]
    finished.extend(beams)
    return max(finished, key=lambda h: h[1] / max(1, len(h[0])))


async def _top_k(executor, runner, tokens: list[int], k: int):
    page_size = runner.info.page_size
    pages = await executor.submit(AllocPages("reference", pages_for(runner, len(tokens))))
    try:
        result = await executor.submit(Forward(
            owner="reference", kv_pages=pages,
            last_page_len=len(tokens) - (len(pages) - 1) * page_size,
            positions=list(range(len(tokens))), tokens=tokens,
            output_indices=[len(tokens) - 1], top_k=k))
    finally:
        await executor.submit(FreePages("reference", pages))
    return result.dists[0]


WAT_ADVERSARIES = {
    "spin": ("limit", "cpu_time"),
    "membomb": ("trap", None),
    "giant": ("limit", "message_size"),
    "flood": ("limit", "outstanding"),
    "forge": ("trap", None),
    "forward_trap": ("trap", None),
    "oob": ("trap", None),
}


async def test_adversaries_do_not_disturb_text_completions(tiny_runner):
    """Guests that spin, exhaust memory, flood, forge ids or trap mid-forward run beside real
    inferlets, which produce exactly the tokens they produce alone."""
    prompt = "Once upon a time"
    limits = InstanceLimits(cpu_time=0.2, memory_bytes=16 * MiB, max_outstanding=64)
    async with running_stack(tiny_runner, limits) as stack:
        reference = await complete(stack.executor, tiny_runner.tokenizer.encode(prompt),
                                   max_tokens=16, owner="reference", ignore_stop=True)
        outcomes: dict[str, object] = {}

        async def run(name: str, program: str, *args) -> None:
            outcomes[name] = await finish(await stack.launch(program, *args))

        async with trio.open_nursery() as nursery:
            for guest in WAT_ADVERSARIES:
                nursery.start_soon(run, guest, guest)
            for i in range(3):
                nursery.start_soon(run, f"normal{i}", "text-completion", "--prompt", prompt,
                                   "--max-tokens", 16, "--ignore-eos")
        stats = stack.controller.stats()
    for guest, expected in WAT_ADVERSARIES.items():
        assert (outcomes[guest].reason, outcomes[guest].limit) == expected, guest
    for i in range(3):
        assert outcomes[f"normal{i}"].return_value == tiny_runner.tokenizer.decode(reference)
    assert stats["pages_in_use"] == 0 and stats["instances"] == 0
