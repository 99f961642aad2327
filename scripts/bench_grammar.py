"""Constrained against unconstrained decoding: time per generated token, and their ratio.

    python scripts/bench_grammar.py            real model (SmolLM2-135M), 4 sequences x 48 tokens
    python scripts/bench_grammar.py --quick    tiny random model, a smoke run

Both runs drive the control layer the way an inferlet does — one `forward` per token per
sequence, the sequences side by side on their own queues so each step is one batched forward —
over the real executor, greedy. The constrained run names a matcher in each sampler: the mask is
computed in control, applied inside the batched forward, and the matcher advanced by the sampled
token. Its grammar is a JSON Schema (an array of at least 100 objects with free-text strings)
that cannot end within the run, so both runs decode exactly the same number of steps; the
unconstrained run ignores stop tokens for the same reason. Prefill is not timed. As timing on a
shared machine is noisy, it also replays a constrained run's tokens through a matcher alone:
the host's own cost per token (mask and advance), to set against the time per token.

The guest side (WebAssembly, host calls) costs the same in both and is left out, so the ratio is
the one a guest sees at worst. Target: at most 1.10. Runs alternate; the median of each is kept.
Progress goes to stderr; the last line of stdout is one JSON record (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

from pie_trio.control.controller import Controller
from pie_trio.control.grammar import Matcher
from pie_trio.control.instance import InstanceControl
from pie_trio.executor.executor import Executor
from pie_trio.model import ModelRunner
from pie_trio.model.tiny import tiny_runner

TARGET = 1.10
SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "note": {"type": "string"},
                       "score": {"type": "integer"}},
        "required": ["name", "note", "score"],
        "additionalProperties": False,
    },
}
PROMPT = "Write a JSON list of famous scientists with a short note and a score for each:"


@dataclass(frozen=True)
class Sizes:
    sequences: int
    max_tokens: int
    repeats: int


QUICK = Sizes(sequences=2, max_tokens=16, repeats=1)
FULL = Sizes(sequences=4, max_tokens=48, repeats=3)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def call(ctl: InstanceControl, op: str, **fields: Any) -> Any:
    """One request, answered: its `ok` value (an error response raises)."""
    answered = trio.Event()
    response: dict[str, Any] = {}

    def on_done(value: dict[str, Any]) -> None:
        response.update(value)
        answered.set()

    ctl.start_request({"op": op, **fields}, on_done)
    await answered.wait()
    if "error" in response:
        raise RuntimeError(f"{op}: {response['error']}")
    return response["ok"]


async def decode(ctl: InstanceControl, runner: ModelRunner, matcher: int | None, steps: int,
                 prefilled: trio.Event, ready: list[int], go: trio.Event,
                 sampled: list[int]) -> None:
    """Prefill the prompt, wait for `go`, then `steps` greedy decode steps on a queue of its own;
    the sampled tokens go to `sampled`."""
    page_size = runner.info.page_size
    prompt = runner.tokenizer.encode(PROMPT)
    total = len(prompt) + steps
    pages = await call(ctl, "alloc_pages", count=math.ceil(total / page_size))
    queue = await call(ctl, "create_queue")
    sampler: dict[str, Any] = {"temperature": 0.0}
    if matcher is not None:
        sampler["matcher"] = matcher
    inputs, length = prompt, 0
    for step in range(steps + 1):
        if step == 1:  # prefill done: wait until every sequence is ready
            ready[0] -= 1
            if ready[0] == 0:
                prefilled.set()
            await go.wait()
        end = length + len(inputs)
        used = pages[:math.ceil(end / page_size)]
        value = await call(ctl, "forward", queue=queue, pages=used,
                           last_page_len=end - (len(used) - 1) * page_size,
                           positions=list(range(length, end)), tokens=inputs,
                           outputs=[len(inputs) - 1], sampler=sampler)
        inputs, length = value["tokens"], end
        sampled += inputs
    await call(ctl, "free_pages", pages=pages)


async def timed_run(controller: Controller, runner: ModelRunner, sizes: Sizes,
                    constrained: bool, name: str, sampled: list[int] | None = None) -> float:
    """Seconds per decode step (one token for every sequence) of one run; the tokens of its
    first sequence go to `sampled`."""
    ctl = controller.attach(name)
    try:
        matchers: list[int | None] = [None] * sizes.sequences
        if constrained:
            grammar = await call(ctl, "grammar_compile", kind="json_schema",
                                 source=json.dumps(SCHEMA))
            matchers = [await call(ctl, "matcher_create", grammar=grammar)
                        for _ in range(sizes.sequences)]
        prefilled, go = trio.Event(), trio.Event()
        ready = [sizes.sequences]
        async with trio.open_nursery() as nursery:
            for i, matcher in enumerate(matchers):
                tokens = sampled if i == 0 and sampled is not None else []
                nursery.start_soon(decode, ctl, runner, matcher, sizes.max_tokens, prefilled,
                                   ready, go, tokens)
            await prefilled.wait()
            started = time.perf_counter()
            go.set()
        return (time.perf_counter() - started) / sizes.max_tokens
    finally:
        await ctl.close()


async def bench_constrained_async(runner: ModelRunner, sizes: Sizes) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        executor = Executor(runner)
        await nursery.start(executor.run)
        controller = Controller(executor, runner.info, runner.tokenizer)
        await nursery.start(controller.run)
        # Warm-up: the tokenizer for llguidance, the grammar, the model's kernels.
        await timed_run(controller, runner, Sizes(sizes.sequences, 4, 1), True, "warm-c")
        await timed_run(controller, runner, Sizes(sizes.sequences, 4, 1), False, "warm-u")
        times: dict[bool, list[float]] = {True: [], False: []}
        sampled: list[int] = []
        for repeat in range(sizes.repeats):
            for constrained in (False, True):
                keep = sampled if constrained and not sampled else None
                seconds = await timed_run(controller, runner, sizes, constrained,
                                          f"run-{repeat}-{constrained}", keep)
                times[constrained].append(seconds)
                log(f"{'constrained' if constrained else 'unconstrained':>13}: "
                    f"{seconds * 1000:.2f} ms per step")
        host_us = await matcher_cost(controller, sampled)
        nursery.cancel_scope.cancel()
    plain, masked = statistics.median(times[False]), statistics.median(times[True])
    return {
        "model": runner.info.name,
        "sequences": sizes.sequences,
        "tokens_per_sequence": sizes.max_tokens,
        "repeats": sizes.repeats,
        "unconstrained_ms_per_token": 1000 * plain / sizes.sequences,
        "constrained_ms_per_token": 1000 * masked / sizes.sequences,
        "ratio": masked / plain,
        "grammar_host_us_per_token": host_us,
        "target": TARGET,
        "meets_target": masked / plain <= TARGET,
    }


async def matcher_cost(controller: Controller, tokens: list[int]) -> float:
    """Microseconds per token the control layer spends on a matcher (mask, then advance),
    replaying a constrained run's tokens: the part of the ratio that timing noise hides."""
    grammar = await controller.grammar_compiler.compile("json_schema", json.dumps(SCHEMA))
    matcher = Matcher(grammar, controller.info.vocab_size)
    started = time.perf_counter()
    for token in tokens:
        matcher.mask()
        matcher.advance(token)
    return 1e6 * (time.perf_counter() - started) / max(1, len(tokens))


def bench_constrained(runner: ModelRunner | None = None, *, quick: bool = False,
                      sizes: Sizes | None = None) -> dict[str, Any]:
    """Time per token constrained against unconstrained; `runner` defaults to the real model
    (the tiny one with `quick`)."""
    if runner is None:
        runner = tiny_runner() if quick else ModelRunner.load("default")
    return trio.run(bench_constrained_async, runner, sizes or (QUICK if quick else FULL))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small sizes")
    parser.add_argument("--json", help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    record = bench_constrained(quick=args.quick)
    print(f"constrained / unconstrained time per token: {record['ratio']:.3f} "
          f"(target <= {TARGET}); the grammar's own host cost: "
          f"{record['grammar_host_us_per_token']:.0f} us per token")
    line = json.dumps(record)
    print(line)
    if args.json:
        with open(args.json, "w") as out:
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
