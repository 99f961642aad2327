"""Benchmark the inferlet runtime: host-call overhead, spawn time, and the cost of programmability.

    python scripts/bench_runtime.py            real model (SmolLM2-135M), full sizes
    python scripts/bench_runtime.py --quick    tiny random model, small sizes (seconds)
    python scripts/bench_runtime.py --model-process   the model in a process of its own
    python scripts/bench_runtime.py --only crowd      1000 concurrent text completions
    python scripts/bench_runtime.py --only programmability --profile-loop
                                               ... and the trio thread's Python by layer

Four measurements, each on the server's stack (pie_trio/stack.py: executor, controller,
runtime) in one process, the model in it too unless --model-process puts it in a child process
(pie_trio/model/remote.py) and lowers this process's priority below it (--server-nice), as
`pie-trio serve --model-process` does:

1. per-call overhead: a WAT guest (tests/guests/ping.wat) loops N `call`s of `ping`, which the
   control layer answers on the guest's own thread (it touches no shared state), and N `call`s
   of `ping` naming queue 0, which wait in line on the trio thread: one guest→trio→guest round
   trip and a pass of the queue's task each. For comparison, N `call`s of `version`
   (tests/guests/local.wat), which the runtime answers in the guest thread, and the floor: N
   bare thread→trio→thread round trips (`run_sync_soon` and a lock). Also how much
   CPU a spinning guest (tests/guests/spin.wat) gets past a 0.5 s CPU budget.
2. spawn time: launch K trivial guests at once (tests/guests/exit.wat) and wait until every one
   has terminated, for K = 1, 4, 16, 64, 256, 1024.
3. the cost of programmability: the built-in text-completion inferlet against direct generation
   (pie_trio/executor/direct.py, what `pie-trio complete` runs) on the same executor, greedy,
   --ignore-eos, at 1 and 32 concurrent sequences. Reported per output token: the decode rate
   (the first token of any sequence to the last of all), the mean TPOT of one sequence (its
   first to its last token) and end to end (launch to end, prompt included), as
   inferlet/direct ratios, and how long the executor waited after each tick for the callers it
   answered to come back (the runtime's share of a step, less sensitive than the ratios to a
   machine whose other load slows the forwards). Runs alternate between the two and the
   median is kept. With --profile-loop, one more inferlet run per sequence count under
   cProfile: the trio thread's Python time and calls per token, by layer. Then (not with
   --quick) 8 chat turns at once left to end on the model's stop token: the median time from
   a turn's last text to its instance's end.
4. a crowd: N (1000; 200 with --quick) text-completion inferlets launched at once, greedy, 16
   tokens each, on a stack whose KV policy and page pool are the server's defaults (`preempt`,
   so the pool is contended and newer instances wait in host memory). Progress every few
   seconds; a stall (nothing ended, no token for --stall-after seconds) fails the run. Reported:
   terminations, output tokens, tokens/s, mean forward batch, preemptions; then a leak check
   (instances, guest threads, threads, trio tasks, KV pages and embedding slots back to where
   they were), which fails the run (exit status 1) if anything is still held.

Progress goes to stderr; the last line of stdout is one JSON record (also written to --json).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import wasmtime

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "tests" / "guests"
SPAWN_COUNTS = (1, 4, 16, 64, 256, 1024)
PROMPT = "Once upon a time"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_to_end(instance, on_message: Callable[[], None] | None = None) -> dict:
    last = None
    async for event in instance.events:
        if event["event"] == "message" and on_message is not None:
            on_message()
        last = event
    assert last is not None and last["event"] == "terminated"
    return last


# -- 1. per-call overhead -------------------------------------------------------------------

async def bench_calls(runtime, guests: dict[str, str], calls: int) -> dict:
    results = {}
    for name, guest, queued in (("ping_via_control_us", "ping", "0"),
                                ("ping_on_queue_us", "ping", "1"),
                                ("local_answer_us", "local", "0")):
        await run_to_end(await runtime.launch(guests[guest], ["100", queued], "bench"))  # warm
        start = time.perf_counter()
        # Unpaced: this measures the cost of one call, not the fair share a shared server
        # grants a guest that does nothing but call the host.
        from pie_trio.runtime.sandbox import InstanceLimits

        unpaced = InstanceLimits(host_call_share=1, host_call_total_share=1)
        end = await run_to_end(await runtime.launch(guests[guest], [str(calls), queued],
                                                    "bench", limits=unpaced))
        elapsed = time.perf_counter() - start
        assert end["reason"] == "finished", end
        results[name] = round(elapsed / calls * 1e6, 2)
        label = "ping on queue 0" if queued == "1" else guest
        log(f"  {label:15s}: {results[name]:8.2f} µs per call ({calls} calls)")
    return results


async def bench_crossing_floor(calls: int) -> float:
    """µs per bare round trip from a thread to the trio thread and back (`run_sync_soon` and a
    lock, nothing else): the floor under any answer that must come from the trio thread."""
    import threading

    token = trio.lowlevel.current_trio_token()
    answered = threading.Lock()
    answered.acquire()

    def loop() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            token.run_sync_soon(answered.release)
            answered.acquire()
        return time.perf_counter() - start

    elapsed = await trio.to_thread.run_sync(loop)
    floor = round(elapsed / calls * 1e6, 2)
    log(f"  floor: {floor:8.2f} µs per bare thread → trio → thread round trip")
    return floor


async def bench_cpu_limit(runtime, guests: dict[str, str], budget: float) -> dict:
    """How far past its CPU budget a spinning guest gets before it is stopped."""
    from pie_trio.runtime.sandbox import InstanceLimits

    end = await run_to_end(await runtime.launch(guests["spin"], [], "bench",
                                                limits=InstanceLimits(cpu_time=budget)))
    assert end.get("limit") == "cpu_time", end
    used = float(re.search(r"ran ([0-9.]+) s of CPU", end["detail"]).group(1))
    log(f"  spin with a {budget} s CPU budget: stopped after {used:.3f} s of CPU")
    return {"budget_s": budget, "used_s": used, "overshoot_ms": round((used - budget) * 1e3, 1)}


# -- 2. spawn time --------------------------------------------------------------------------

async def bench_spawn(runtime, guests: dict[str, str], counts: tuple[int, ...]) -> dict:
    results = {}
    await run_to_end(await runtime.launch(guests["exit"], ["0"], "bench"))  # warm up
    for count in counts:
        ends: list[dict] = []
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(_spawn_one, runtime, guests["exit"], ends)
        elapsed = time.perf_counter() - start
        assert all(e["reason"] == "finished" for e in ends) and len(ends) == count
        results[str(count)] = {"total_ms": round(elapsed * 1e3, 2),
                               "per_instance_ms": round(elapsed / count * 1e3, 3)}
        log(f"  {count:5d} instances: {elapsed * 1e3:9.1f} ms "
            f"({elapsed / count * 1e3:.3f} ms each)")
    return results


async def _spawn_one(runtime, program: str, ends: list[dict]) -> None:
    ends.append(await run_to_end(await runtime.launch(program, ["0"], "bench")))


# -- 3. the cost of programmability ---------------------------------------------------------

class Timing:
    """Per sequence: launch, first token, last token, end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.end: float | None = None
        self.stopped = False  # ended on a stop token (chat_sequence)

    def token(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now


async def direct_sequence(executor, prompt_tokens, max_tokens: int, owner: str) -> Timing:
    from contextlib import aclosing

    from pie_trio.executor.direct import generate

    timing = Timing()
    async with aclosing(generate(executor, prompt_tokens, max_tokens=max_tokens, owner=owner,
                                 ignore_stop=True)) as tokens:
        async for _ in tokens:
            timing.token()
    timing.end = time.perf_counter()
    return timing


async def run_completion(runtime, args: list[str]) -> tuple[Timing, int]:
    """The text-completion inferlet with `args`, to its end: its timing and how many pieces of
    text it sent."""
    timing, texts = Timing(), 0

    def token() -> None:
        nonlocal texts
        texts += 1
        timing.token()

    instance = await runtime.launch("text-completion", args, "bench")
    end = await run_to_end(instance, token)
    assert end["reason"] == "finished", end
    timing.end = time.perf_counter()
    return timing, texts


async def inferlet_sequence(runtime, max_tokens: int) -> Timing:
    timing, _ = await run_completion(
        runtime, ["--prompt", PROMPT, "--max-tokens", str(max_tokens), "--ignore-eos"])
    return timing


STOP_QUESTIONS = ("What is the capital of France?", "Name a primary color.", "What is 2+2?",
                  "Say hello.")
STOP_MAX_TOKENS = 128


async def chat_sequence(runtime, question: str) -> Timing:
    """A text-completion chat turn left to end on the model's stop token."""
    timing, texts = await run_completion(
        runtime, ["--prompt", question, "--chat", "--max-tokens", str(STOP_MAX_TOKENS)])
    # (A piece of text per token at most: fewer than the limit means the stop token ended it.)
    timing.stopped = texts < STOP_MAX_TOKENS
    return timing


async def bench_stop_tail(runtime, count: int, repeats: int) -> dict:
    """How long after its last text a chat turn that ends on its stop token ends: the SDK gives
    up the step it submitted ahead (`discard`) rather than waiting a tick for it, so this is
    the stop token's own step and the instance's exit. Median over each run's sequences."""
    runs = []
    for _ in range(repeats):
        timings = await concurrently(count, lambda i: chat_sequence(
            runtime, STOP_QUESTIONS[i % len(STOP_QUESTIONS)]))
        tails = [t.end - t.last for t in timings if t.stopped and t.last and t.end]
        if tails:
            runs.append(statistics.median(tails))
    return {"sequences": count, "runs_ms": [round(r * 1e3, 2) for r in runs],
            "median_ms": round(statistics.median(runs) * 1e3, 2) if runs else None}


async def concurrently(count: int, make: Callable[[int], Awaitable[Timing]]) -> list[Timing]:
    timings: list[Timing] = []

    async def one(i: int) -> None:
        timings.append(await make(i))

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return timings


def per_token(timings: list[Timing], max_tokens: int) -> tuple[float, float, float]:
    """(decode seconds per token, end-to-end seconds per token) over all sequences at once, and
    the mean time per output token of one sequence (TPOT as vLLM's benchmarks define it: its
    first to its last token, over the tokens after its first)."""
    first = min(t.first for t in timings)
    last = max(t.last for t in timings)
    start = min(t.start for t in timings)
    end = max(t.end for t in timings)
    tokens = len(timings) * max_tokens
    decoded = len(timings) * (max_tokens - 1)  # tokens after each sequence's first
    tpot = statistics.mean((t.last - t.first) / (max_tokens - 1) for t in timings)
    return (last - first) / decoded, (end - start) / tokens, tpot


async def bench_programmability(executor, runtime, tokenizer, max_tokens: int,
                                sequences: tuple[int, ...], repeats: int,
                                profile: bool = False) -> dict:
    prompt_tokens = tokenizer.encode(PROMPT)
    await inferlet_sequence(runtime, 4)  # warm up: compile, vocabulary, model
    await direct_sequence(executor, prompt_tokens, 4, "warmup")
    results = {}
    for count in sequences:
        runs: dict[str, list[tuple[float, float, float]]] = {"direct": [], "inferlet": []}
        batches: dict[str, Counter[int]] = {"direct": Counter(), "inferlet": Counter()}
        ticks: dict[str, list[Step]] = {"direct": [], "inferlet": []}
        for repeat in range(repeats):
            before = Counter(executor.stats.forward_calls)
            with TickTimes(executor, ticks["direct"]):
                direct = await concurrently(count, lambda i: direct_sequence(
                    executor, prompt_tokens, max_tokens, f"direct{i}"))
            runs["direct"].append(per_token(direct, max_tokens))
            middle = Counter(executor.stats.forward_calls)
            with TickTimes(executor, ticks["inferlet"]):
                inferlet = await concurrently(count, lambda i: inferlet_sequence(runtime,
                                                                                 max_tokens))
            runs["inferlet"].append(per_token(inferlet, max_tokens))
            batches["direct"] += middle - before
            batches["inferlet"] += Counter(executor.stats.forward_calls) - middle
            log(f"  {count:2d} sequences, run {repeat + 1}/{repeats}: decode "
                f"{runs['direct'][-1][0] * 1e3:.2f} ms/token direct, "
                f"{runs['inferlet'][-1][0] * 1e3:.2f} ms/token inferlet")
        direct_decode = statistics.median(r[0] for r in runs["direct"])
        inferlet_decode = statistics.median(r[0] for r in runs["inferlet"])
        direct_e2e = statistics.median(r[1] for r in runs["direct"])
        inferlet_e2e = statistics.median(r[1] for r in runs["inferlet"])
        direct_tpot = statistics.median(r[2] for r in runs["direct"])
        inferlet_tpot = statistics.median(r[2] for r in runs["inferlet"])
        # Each run's ratio to the direct run just before it: the machine's speed drifts over
        # a benchmark (shared cores), and adjacent runs see about the same machine.
        paired = statistics.median(
            i[0] / d[0] for d, i in zip(runs["direct"], runs["inferlet"], strict=True))
        results[str(count)] = {
            "direct_decode_ms_per_token": round(direct_decode * 1e3, 3),
            "inferlet_decode_ms_per_token": round(inferlet_decode * 1e3, 3),
            "decode_ratio": round(inferlet_decode / direct_decode, 3),
            "paired_decode_ratio": round(paired, 3),
            "direct_e2e_ms_per_token": round(direct_e2e * 1e3, 3),
            "inferlet_e2e_ms_per_token": round(inferlet_e2e * 1e3, 3),
            "e2e_ratio": round(inferlet_e2e / direct_e2e, 3),
            # Per sequence: unlike the decode rate above, not stretched by sequences that
            # started a tick or two after the others (launches spread their first forwards).
            "direct_tpot_ms": round(direct_tpot * 1e3, 3),
            "inferlet_tpot_ms": round(inferlet_tpot * 1e3, 3),
            "tpot_ratio": round(inferlet_tpot / direct_tpot, 3),
            # Forward calls per executor batch: how well the sequences stayed in lockstep.
            "direct_mean_batch": round(_mean_batch(batches["direct"]), 2),
            "inferlet_mean_batch": round(_mean_batch(batches["inferlet"]), 2),
            # How long the executor took after each tick to answer its callers and see them
            # back: the runtime's share of a step, and less sensitive than the ratios to a
            # forward slowed by the machine's other load.
            "direct_settle_ms": round(_tick_median(ticks["direct"], 0) * 1e3, 3),
            "inferlet_settle_ms": round(_tick_median(ticks["inferlet"], 0) * 1e3, 3),
            # A step is a tick and the time after it. The two paths' ticks differ only where
            # the trio thread's work overlaps the forward and takes the GIL from its Python.
            "direct_tick_ms": round(_tick_median(ticks["direct"], 1) * 1e3, 3),
            "inferlet_tick_ms": round(_tick_median(ticks["inferlet"], 1) * 1e3, 3),
            "direct_ticks": _tick_median(ticks["direct"], 2),
            "inferlet_ticks": _tick_median(ticks["inferlet"], 2),
            "direct_loop_cpu_ms": round(_tick_median(ticks["direct"], 3) * 1e3, 3),
            "inferlet_loop_cpu_ms": round(_tick_median(ticks["inferlet"], 3) * 1e3, 3),
        }
        r = results[str(count)]
        log(f"  {count:2d} sequences: inferlet/direct = {r['decode_ratio']:.3f}x decode "
            f"({r['paired_decode_ratio']:.3f}x paired), {r['tpot_ratio']:.3f}x TPOT, "
            f"{r['e2e_ratio']:.3f}x end to end; mean forward batch {r['direct_mean_batch']} "
            f"direct, {r['inferlet_mean_batch']} inferlet")
        log(f"  {count:2d} sequences, per step: forward {r['direct_tick_ms']} ms direct, "
            f"{r['inferlet_tick_ms']} ms inferlet; answering and waiting for callers after it "
            f"{r['direct_settle_ms']} ms direct, {r['inferlet_settle_ms']} ms inferlet; steps "
            f"{r['direct_ticks']:g} direct, {r['inferlet_ticks']:g} inferlet; the trio thread's "
            f"CPU {r['direct_loop_cpu_ms']} ms direct, {r['inferlet_loop_cpu_ms']} ms inferlet")
        if profile:
            r["loop_profile"] = await profile_loop(runtime, count, max_tokens)
            log(f"  {count:2d} sequences, the trio thread's Python per token, by layer "
                "(cProfile: every call slowed alike, so compare layers; the calls are exact): "
                + "; ".join(f"{layer} {v['us_per_token']} µs, {v['calls_per_token']} calls"
                            for layer, v in r["loop_profile"].items()))
    return results


# cProfile entries that are the trio thread waiting, not working: epoll's wait, and the GIL
# yield to a woken guest (Bridge._release), which times the guest's run in its wall clock.
IDLE = frozenset({"<method 'poll' of 'select.epoll' objects>", "<built-in method time.sleep>"})


async def profile_loop(runtime, count: int, max_tokens: int) -> dict[str, dict[str, float]]:
    """Where the trio thread's Python goes over one more run of `count` text-completion
    inferlets: cProfile of this thread (guest threads are not profiled), each function's own
    time and calls grouped by layer — pie_trio's packages, trio, the interpreter's built-in
    functions (called from all of them), the rest — per output token, largest first."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        await concurrently(count, lambda i: inferlet_sequence(runtime, max_tokens))
    finally:
        profiler.disable()
    tokens = count * max_tokens
    layers: dict[str, list[float]] = {}
    for (path, _, name), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items():
        if name not in IDLE:
            layer = layers.setdefault(_layer(path), [0.0, 0])
            layer[0] += own
            layer[1] += calls
    return {name: {"us_per_token": round(own / tokens * 1e6, 1),
                   "calls_per_token": round(calls / tokens, 1)}
            for name, (own, calls) in sorted(layers.items(), key=lambda kv: -kv[1][0])}


def _layer(path: str) -> str:
    """The layer a profiled function belongs to, from its file (cProfile names built-ins `~`)."""
    import pie_trio

    if path == "~":
        return "builtins"
    file, package = Path(path), Path(pie_trio.__file__).parent
    if file.is_relative_to(package):
        return "pie_trio." + file.relative_to(package).parts[0].removesuffix(".py")
    if file.is_relative_to(Path(trio.__file__).parent):
        return "trio"
    return "other"


Step = tuple[float, float, int, float]  # after the tick, the tick, ticks, trio CPU (per tick)


class TickTimes:
    """Appends to `into`, over the block, the executor's mean time per tick from the tick's end
    to the next plan (answering its callers and waiting for them to come back), the mean time
    of a tick itself (the forward, as the trio thread saw it), the tick count, and the CPU the
    trio thread (this one: the runtime, the control layer, the executor's planning) used per
    tick, which is what the runtime adds to a step at many streams."""

    def __init__(self, executor, into: list[Step]) -> None:
        self.executor, self.into = executor, into

    def __enter__(self) -> None:
        stats = self.executor.stats
        self.ticks, self.settled, self.ran = stats.ticks, stats.settle_seconds, stats.tick_seconds
        self.cpu = time.thread_time()

    def __exit__(self, *exc_info: object) -> None:
        stats = self.executor.stats
        ticks = max(1, stats.ticks - self.ticks)
        self.into.append(((stats.settle_seconds - self.settled) / ticks,
                          (stats.tick_seconds - self.ran) / ticks, stats.ticks - self.ticks,
                          (time.thread_time() - self.cpu) / ticks))


def _tick_median(ticks: list[Step], field: int) -> float:
    return statistics.median(t[field] for t in ticks)


def _mean_batch(sizes: Counter[int]) -> float:
    batches = sum(sizes.values())
    return sum(size * n for size, n in sizes.items()) / batches if batches else 0.0


# -- 4. a crowd -----------------------------------------------------------------------------

CROWD = 1000  # text completions launched at once (--crowd)
QUICK_CROWD = 200
CROWD_TOKENS = 16
CROWD_PROMPT = "Once upon a time, story {}"  # numbered, so that no two prompts are the same
PROGRESS_EVERY = 5.0  # seconds between progress lines
# What ends after the last instance does: trio's idle worker threads (tokenizer calls, program
# loads) leave 10 s after their last job, so the leak check waits up to this long for them.
SETTLE_S = 30.0


class CrowdRun:
    """One crowd in flight: its ends so far and the executor's counters it started from."""

    def __init__(self, stack, count: int) -> None:
        self.stack = stack
        self.count = count
        self.ends: list[dict] = []
        self.stalled: str | None = None
        stats = stack.executor.stats
        self._forwards = stats.calls["forward"] - stats.failed["forward"]
        self.batches_before = Counter(stats.forward_calls)
        self.control_before = stack.controller.stats()

    def tokens(self) -> int:
        """Output tokens so far: text-completion samples exactly one token per forward call."""
        stats = self.stack.executor.stats
        return stats.calls["forward"] - stats.failed["forward"] - self._forwards

    def progress(self) -> tuple[int, int, int]:
        """(ended, running, tokens so far)."""
        return len(self.ends), len(self.stack.runtime.instances), self.tokens()


async def bench_crowd(stack, count: int, max_tokens: int = CROWD_TOKENS,
                      stall_after: float = 120.0) -> dict:
    """Launch `count` text completions at once on `stack`, wait for every one to end, and
    check that nothing they used is still held. `ok` is False on a stall, an instance that did
    not finish, a token count off, or a leak; `problems` says which."""
    await inferlet_sequence(stack.runtime, 4)  # warm up: compile, vocabulary, model
    baseline = footprint(stack)
    crowd = CrowdRun(stack, count)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_crowd, crowd, stall_after, nursery.cancel_scope)
        async with trio.open_nursery() as members:
            for i in range(count):
                members.start_soon(_crowd_member, stack.runtime, i, max_tokens, crowd.ends)
        nursery.cancel_scope.cancel()  # every member ended: stop the watcher
    wall = time.perf_counter() - start
    record = _crowd_record(crowd, max_tokens, wall)
    if crowd.stalled is not None:
        record["problems"].append(crowd.stalled)
        record["leak_check"] = "skipped: the crowd stalled"
    else:
        record["leak_check"] = await check_leaks(stack, baseline)
        record["problems"].extend(record["leak_check"]["leaks"])
    record["ok"] = not record["problems"]
    return record


async def _crowd_member(runtime, i: int, max_tokens: int, ends: list[dict]) -> None:
    args = ["--prompt", CROWD_PROMPT.format(i), "--max-tokens", str(max_tokens), "--ignore-eos"]
    ends.append(await run_to_end(await runtime.launch("text-completion", args, "crowd")))


async def _watch_crowd(crowd: CrowdRun, stall_after: float, cancel: trio.CancelScope) -> None:
    """Print progress every few seconds; stop the crowd when nothing moved for `stall_after`
    seconds (no instance ended and no token came out: a deadlock)."""
    last, last_change = crowd.progress(), time.perf_counter()
    while True:
        await trio.sleep(PROGRESS_EVERY)
        ended, running, tokens = now = crowd.progress()
        log(f"  crowd: {ended}/{crowd.count} ended, {running} running, {tokens} tokens")
        if (now[0], now[2]) != (last[0], last[2]):
            last, last_change = now, time.perf_counter()
        elif time.perf_counter() - last_change > stall_after:
            crowd.stalled = (f"stalled: no instance ended and no token came out for "
                             f"{stall_after:.0f} s ({ended}/{crowd.count} ended, {running} "
                             f"running, {tokens} tokens)")
            log(f"  crowd {crowd.stalled}")
            cancel.cancel()
            return


def _crowd_record(crowd: CrowdRun, max_tokens: int, wall: float) -> dict:
    executor, controller = crowd.stack.executor, crowd.stack.controller
    reasons = Counter(end["reason"] for end in crowd.ends)
    tokens = crowd.tokens()
    control = controller.stats()
    record = {
        "count": crowd.count, "max_tokens": max_tokens,
        "kv_policy": controller.limits.kv_policy, "kv_pages": control["pages_total"],
        "terminations": dict(reasons), "output_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_forward_batch": round(
            _mean_batch(Counter(executor.stats.forward_calls) - crowd.batches_before), 2),
        **{key: control[key] - crowd.control_before[key]
           for key in ("preemptions", "restores", "swap_bytes")},
        "problems": [],
    }
    log(f"  {crowd.count} instances: {dict(reasons)}, {tokens} tokens in {wall:.1f} s = "
        f"{record['tokens_per_s']} tokens/s; mean forward batch {record['mean_forward_batch']}, "
        f"{record['preemptions']} preemptions, {record['restores']} restores")
    if reasons["finished"] != crowd.count:
        others = {reason: n for reason, n in reasons.items() if reason != "finished"}
        detail = next((e["detail"] for e in crowd.ends if e["reason"] != "finished"), "")
        record["problems"].append(f"{crowd.count - reasons['finished']} of {crowd.count} did "
                                  f"not finish: {others} (first: {detail!r})")
    # Each instance samples at most max_tokens, so the total is right only if each one's is.
    if tokens != crowd.count * max_tokens:
        record["problems"].append(f"{tokens} output tokens, not {crowd.count} × {max_tokens}")
    return record


def footprint(stack) -> dict[str, int]:
    """What the process holds now, for the leak check."""
    from pie_trio.server.serve import task_count

    control, runtime = stack.controller.stats(), stack.runtime.stats()
    return {
        "instances": runtime["instances"],
        "guest_threads": runtime["guest_threads"],
        "control_instances": control["instances"],
        "threads": threading.active_count(),
        "trio_tasks": task_count(),  # as /metrics counts them
        "kv_pages_free": stack.controller.pages.free(),
        "kv_pages_total": control["pages_total"],
        "kv_pages_swapped": control["swapped_pages"],
        "embed_slots_free": stack.controller.slots.free(),
        "embed_slots_total": control["slots_total"],
    }


def leaks(now: dict[str, int], baseline: dict[str, int]) -> list[str]:
    """Each way `now` holds more than an idle stack should; empty when nothing leaked."""
    found = [f"{key} = {now[key]}, not 0"
             for key in ("instances", "guest_threads", "control_instances", "kv_pages_swapped")
             if now[key]]
    found += [f"{key} = {now[key]}, above the {baseline[key]} before the crowd"
              for key in ("threads", "trio_tasks") if now[key] > baseline[key]]
    found += [f"{what}_free = {now[what + '_free']} of {now[what + '_total']}"
              for what in ("kv_pages", "embed_slots")
              if now[what + "_free"] != now[what + "_total"]]
    return found


async def check_leaks(stack, baseline: dict[str, int]) -> dict:
    """The footprint once the crowd has ended, against the one before it; waits up to
    SETTLE_S for what ends asynchronously (idle worker threads)."""
    start = time.perf_counter()
    while True:
        now = footprint(stack)
        found = leaks(now, baseline)
        if not found or time.perf_counter() - start >= SETTLE_S:
            break
        await trio.sleep(0.5)
    settled = round(time.perf_counter() - start, 1)
    log(f"  leak check after {settled} s: " + ", ".join(
        f"{key} {baseline[key]} -> {now[key]}" for key in now))
    for leak in found:
        log(f"  LEAK: {leak}")
    return {"before": baseline, "after": now, "settle_s": settled, "leaks": found}


async def measure_crowd(args: argparse.Namespace, runner, programs) -> dict:
    from pie_trio.config import Config
    from pie_trio.executor.policies import make_policy
    from pie_trio.stack import ControlLimits, open_stack

    log("compiling text-completion ...")
    programs.get("text-completion")
    gc.collect()  # as in `measure`: what lives for good need not be walked by full GC passes
    gc.freeze()
    count = args.crowd or (QUICK_CROWD if args.quick else CROWD)
    served = Config()  # KV pressure handled as `pie-trio serve` handles it by default
    limits = ControlLimits(kv_policy=served.kv_policy, prefix_cache=served.prefix_caching)
    policy = make_policy(args.policy, k=args.k, t=args.t)
    log(f"a crowd: {count} text completions at once, {CROWD_TOKENS} tokens each, "
        f"{runner.info.num_pages} KV pages, kv_policy {limits.kv_policy}:")
    async with open_stack(runner, programs=programs, policy=policy,
                          control_limits=limits) as stack:
        return await bench_crowd(stack, count, CROWD_TOKENS, args.stall_after)


# -- main -----------------------------------------------------------------------------------

async def main_async(args: argparse.Namespace) -> dict:
    from pie_trio.stack import ProgramStore, close_runner

    record: dict = {}
    if args.only != "crowd":
        runner = _load_runner(args, args.pages)
        try:
            record = await measure(args, runner, ProgramStore(memory_only=True))
        finally:
            close_runner(runner)
    if args.only in (None, "crowd"):
        # A runner of its own: its KV pool is the server's default size unless --crowd-pages.
        runner = _load_runner(args, args.crowd_pages)
        try:
            record = {**_describe(args, runner), **record}
            record["crowd"] = await measure_crowd(args, runner, ProgramStore(memory_only=True))
        finally:
            close_runner(runner)
    return record


def _load_runner(args: argparse.Namespace, pages: int | None):
    from pie_trio.stack import load_runner, yield_cpu_to_model

    model = "tiny" if args.quick else args.model
    log(f"loading model {model!r} ...")
    runner = load_runner(model, device="cpu", num_pages=pages, model_process=args.model_process)
    if args.model_process and args.server_nice > 0 and not args.lowered:
        # As `pie-trio serve --model-process` does. (A model process started after this one
        # is lowered, the crowd's, starts at the same niceness: the two are then even.)
        nice = yield_cpu_to_model(args.server_nice)
        args.lowered = True
        log(f"this process's threads at niceness {nice}; the model's process keeps its own")
    return runner


def _describe(args: argparse.Namespace, runner) -> dict:
    return {"model": runner.info.name, "device": runner.info.device, "dtype": runner.info.dtype,
            "quick": args.quick, "policy": args.policy, "model_process": args.model_process,
            "server_nice": args.server_nice if args.model_process else 0}


async def measure(args: argparse.Namespace, runner, programs) -> dict:
    from pie_trio.executor.policies import make_policy
    from pie_trio.stack import open_stack

    guests = {name: programs.add(wasmtime.wat2wasm((GUESTS / f"{name}.wat").read_text()))
              for name in ("ping", "local", "exit", "spin")}
    log("compiling text-completion ...")
    programs.get("text-completion")
    # As a server process should: what is alive now (model, tokenizer, modules) lives for
    # good, so full GC passes need not walk it (each one otherwise stalls everything ~0.3 s).
    gc.collect()
    gc.freeze()
    calls = 2000 if args.quick else args.calls
    counts = tuple(c for c in SPAWN_COUNTS if not args.quick or c <= 256)
    max_tokens = 16 if args.quick else args.max_tokens
    repeats = 1 if args.quick else args.repeats
    record = _describe(args, runner)
    policy = make_policy(args.policy, k=args.k, t=args.t)
    async with open_stack(runner, programs=programs, policy=policy) as stack:
        executor, runtime = stack.executor, stack.runtime
        if args.only in (None, "calls"):
            log("per-call overhead:")
            record["calls"] = await bench_calls(runtime, guests, calls)
            record["calls"]["trio_crossing_floor_us"] = await bench_crossing_floor(calls)
            record["cpu_limit"] = await bench_cpu_limit(runtime, guests, 0.5)
        if args.only in (None, "spawn"):
            log("spawn time (launch to terminated, all at once):")
            record["spawn"] = await bench_spawn(runtime, guests, counts)
        if args.only not in (None, "programmability"):
            return record
        log(f"cost of programmability ({max_tokens} tokens per sequence, greedy):")
        record["programmability"] = await bench_programmability(
            executor, runtime, runner.tokenizer, max_tokens, (1, 32), repeats,
            profile=args.profile_loop)
        record["programmability"]["max_tokens"] = max_tokens
        if not args.quick:  # (the tiny random model does not stop by itself)
            log("the end of a chat turn at its stop token (8 at once):")
            tail = await bench_stop_tail(runtime, 8, repeats)
            record["programmability"]["stop_tail"] = tail
            log(f"  last text to the instance's end: median {tail['median_ms']} ms "
                f"(runs: {tail['runs_ms']})")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints progress to stderr and a JSON record as the last line of stdout.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model and small sizes: a smoke run in seconds")
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    parser.add_argument("--calls", type=int, default=20_000,
                        help="host calls per overhead measurement (default 20000)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens per sequence for the programmability cost (default 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs per configuration; the median is kept (default 3)")
    parser.add_argument("--pages", type=int, default=1024, help="KV pages (default 1024)")
    parser.add_argument("--policy", default="adaptive", choices=("adaptive", "k", "t", "kort"),
                        help="the executor's batching policy (default adaptive, as served)")
    parser.add_argument("--k", type=int, default=32, help="k of the k/kort policies")
    parser.add_argument("--t", type=float, default=0.002, help="t (seconds) of the t/kort policies")
    parser.add_argument("--model-process", action="store_true",
                        help="run the model in a process of its own (as `pie-trio serve "
                        "--model-process`)")
    parser.add_argument("--server-nice", type=int, default=19,
                        help="with --model-process, the niceness added to this process's "
                        "threads, as `pie-trio serve --model-process` adds (default 19; 0: "
                        "none)")
    parser.add_argument("--crowd", type=int,
                        help=f"text completions launched at once by the crowd measurement "
                        f"(default {CROWD}; {QUICK_CROWD} with --quick)")
    parser.add_argument("--crowd-pages", type=int,
                        help="KV pages for the crowd (default: the server's, sized from its KV "
                        "memory budget, so that the crowd contends for them)")
    parser.add_argument("--stall-after", type=float, default=120.0,
                        help="fail the crowd when nothing progresses for this many seconds "
                        "(default 120)")
    parser.add_argument("--profile-loop", action="store_true",
                        help="after the cost of programmability at each sequence count, "
                        "profile the trio thread over one more inferlet run and print its "
                        "Python time and calls per token, by layer (runtime, control, "
                        "executor, trio, ...)")
    parser.add_argument("--only", choices=("calls", "spawn", "programmability", "crowd"),
                        help="run only this measurement (default: all four)")
    parser.add_argument("--json", type=Path, help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    args.lowered = False
    record = trio.run(main_async, args)
    text = json.dumps(record)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    problems = record.get("crowd", {}).get("problems", [])
    for problem in problems:
        log(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
