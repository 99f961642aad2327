"""A crowd of text completions on a contended KV pool: scripts/bench_runtime.py's fourth
measurement, run on the tiny model with far fewer pages than the crowd wants, so that the
`preempt` policy swaps instances out and back. Every instance must finish with all its tokens,
and once the crowd has ended nothing may be held: no instance, guest thread, extra thread or
trio task, KV page, swapped page or embedding slot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import trio

from pie_trio.model.tiny import tiny_runner
from pie_trio.stack import ControlLimits, ProgramStore, open_stack

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench_runtime.py"
COUNT = 300
PAGES = 96  # each instance needs 2 pages (prompt + 16 tokens): the crowd wants 600


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_runtime", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_runtime"] = module
    spec.loader.exec_module(module)
    return module


def test_a_crowd_on_a_contended_pool_finishes_and_leaks_nothing():
    bench = load_bench()

    async def crowd() -> dict:
        limits = ControlLimits(kv_policy="preempt")
        async with open_stack(tiny_runner(num_pages=PAGES), programs=ProgramStore(
                memory_only=True), control_limits=limits) as stack:
            return await bench.bench_crowd(stack, COUNT, max_tokens=16)

    record = trio.run(crowd)
    assert record["terminations"] == {"finished": COUNT}, record
    assert record["output_tokens"] == COUNT * 16, record
    assert record["preemptions"] > 0 and record["restores"] == record["preemptions"], record
    assert record["leak_check"]["leaks"] == [], record
    after = record["leak_check"]["after"]
    assert after["instances"] == after["guest_threads"] == after["kv_pages_swapped"] == 0
    assert after["kv_pages_free"] == after["kv_pages_total"] == PAGES
    assert record["ok"] and record["problems"] == [], record


def test_a_crowd_that_stops_progressing_is_stopped_and_named_stalled(monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "PROGRESS_EVERY", 0.01)

    class Stuck:
        count, stalled = 3, None

        def progress(self):
            return 1, 2, 40  # one ended, two running, never another token

    crowd = Stuck()

    async def watch() -> bool:
        with trio.CancelScope() as scope:
            await bench._watch_crowd(crowd, 0.05, scope)
            await trio.sleep_forever()  # the watcher cancelled its scope: this ends at once
        return scope.cancelled_caught

    assert trio.run(watch)
    assert crowd.stalled.startswith("stalled: no instance ended and no token came out"), crowd
    assert "(1/3 ended, 2 running, 40 tokens)" in crowd.stalled
