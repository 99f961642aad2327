"""`scripts/bench_runtime.py --profile-loop`: where the trio thread's Python goes per token of
real text-completion inferlets (tiny model), by layer."""

from __future__ import annotations

import trio
from test_crowd import load_bench

from pie_trio.model.tiny import tiny_runner
from pie_trio.stack import ProgramStore, open_stack

SEQUENCES, TOKENS = 2, 4


def test_the_loop_profile_splits_a_tokens_python_by_layer():
    bench = load_bench()

    async def profile() -> dict:
        async with open_stack(tiny_runner(num_pages=64),
                              programs=ProgramStore(memory_only=True)) as stack:
            return await bench.profile_loop(stack.runtime, SEQUENCES, TOKENS)

    layers = trio.run(profile)
    # A token's forward passes through every layer on the trio thread, and each layer's
    # functions land in it: none is lumped with the rest.
    for layer in ("pie_trio.runtime", "pie_trio.control", "pie_trio.executor", "trio",
                  "builtins"):
        assert layers[layer]["calls_per_token"] > 0, layers
    assert "pie_trio" not in layers, layers
    times = [v["us_per_token"] for v in layers.values()]
    assert times == sorted(times, reverse=True), layers
