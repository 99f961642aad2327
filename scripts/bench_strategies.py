"""Benchmark the strategy inferlets (docs/strategies.md) against their plain counterparts.

    python scripts/bench_strategies.py            real model (SmolLM2-135M), full sizes
    python scripts/bench_strategies.py --quick    tiny random model, small sizes (a smoke run)

Four comparisons, each on the real stack (`pie_trio.stack.open_stack`) in one process, one
sequence at a time (batch 1), with the modules the build script makes:

1. speculative decoding: `speculative-decoding` against `text-completion`, greedy, on
   copy-heavy prompts; output tokens per second (launch to end) and the accepted tokens per
   forward the guest reports.
2. prefix caching: time to first token (launch to end at one output token) of
   `prefix-caching` importing a ~1,000-token shared prompt against `--no-cache`, which prefills
   it every time.
3. skeleton-of-thought: its points expanded in parallel forks against `--sequential`, and
   tree-of-thought (breadth = the points, 2 kept, depth 2) against `--sequential`, its levels'
   thoughts generated one after another.
4. attention sink: tokens per second generating 1x against 4x the KV budget.

After one short warm-up run of each program, each configuration runs `repeats` times (1 with
`--quick`, else 3) alternating with its counterpart; the median is kept.
Ratios are counterpart time over strategy time (> 1: the strategy is faster). Progress goes to
stderr; the last line of stdout is one JSON record (also written to --json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_inferlets.py"
PROGRAMS = ("text-completion", "speculative-decoding", "prefix-caching", "skeleton-of-thought",
            "attention-sink", "tree-of-thought")

COPY_PROMPTS = (
    "Repeat this text exactly: The quick brown fox jumps over the lazy dog. A journey of a "
    "thousand miles begins with a single step. Practice makes perfect.",
    "Fix the typo in this code and print it again:\n"
    "def area(width, height):\n    return width * heigth\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n",
)
SHARED_PROMPT = (
    "You are the reference desk of a public library. Answer questions about opening hours, "
    "borrowing rules, fees and events. Opening hours: Monday to Friday 9 to 20, Saturday 10 to "
    "16, closed on Sunday. Books are lent for three weeks, films for one week; a loan can be "
    "renewed twice unless someone reserved the item. Late returns cost ten cents a day. "
)
QUESTION = "How can a small team write better software?"
SINK_PROMPT = "Write a long story about a fox who travels around the world."


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Sizes:
    max_tokens: int  # speculative decoding, per prompt
    shared_tokens: int  # prefix caching: about this many tokens of shared prompt
    points: int  # skeleton-of-thought; tree-of-thought's breadth
    point_tokens: int  # and its thought tokens
    budget_pages: int  # attention sink
    repeats: int


QUICK = Sizes(max_tokens=24, shared_tokens=1000, points=3, point_tokens=8, budget_pages=4,
              repeats=1)
FULL = Sizes(max_tokens=128, shared_tokens=1000, points=4, point_tokens=48, budget_pages=8,
             repeats=3)


@dataclass
class Run:
    seconds: float
    return_value: str | None = None
    stdout: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """The guest's JSON report, the last line of its stdout."""
        report: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return report


def build_modules() -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("build_inferlets", BUILD_SCRIPT)
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses look their module up while it executes
    spec.loader.exec_module(build)
    return build.build(log=lambda _: None)  # type: ignore[no-any-return]


async def run_program(runtime: Any, program: str, *args: Any) -> Run:
    start = time.perf_counter()
    instance = await runtime.launch(program, [str(a) for a in args], "bench")
    run = Run(0.0)
    async for event in instance.events:
        run.events.append(event)
        if event["event"] == "return":
            run.return_value = event["value"]
        elif event["event"] == "stdout":
            run.stdout += event["data"]
    run.seconds = time.perf_counter() - start
    end = run.events[-1]
    if end.get("reason") != "finished":
        raise RuntimeError(f"{program} {args} ended with {end}")
    return run


async def alternate(repeats: int, make_a: Callable[[], Awaitable[Run]],
                    make_b: Callable[[], Awaitable[Run]]) -> tuple[list[Run], list[Run]]:
    """Run a and b in turns, `repeats` times each (so drift hits both alike)."""
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(await make_a())
        runs_b.append(await make_b())
    return runs_a, runs_b


def median_seconds(runs: list[Run]) -> float:
    return statistics.median(run.seconds for run in runs)


async def bench_speculative(runtime: Any, programs: dict[str, str], sizes: Sizes) -> dict[str, Any]:
    results = []
    for prompt in COPY_PROMPTS:
        args = ["--max-tokens", sizes.max_tokens, "--chat", "--prompt", prompt]
        plain, speculative = await alternate(
            sizes.repeats,
            partial(run_program, runtime, programs["text-completion"], *args),
            partial(run_program, runtime, programs["speculative-decoding"], *args),
        )
        report = speculative[-1].report()
        same = plain[-1].return_value == speculative[-1].return_value
        plain_rate = report["tokens"] / median_seconds(plain)
        speculative_rate = report["tokens"] / median_seconds(speculative)
        log(f"  {report['tokens']} tokens: plain {plain_rate:.1f} tok/s, speculative "
            f"{speculative_rate:.1f} tok/s, {report['tokens_per_forward']} tokens/forward, "
            f"same text: {same}")
        results.append({"tokens": report["tokens"], "plain_tok_s": round(plain_rate, 2),
                        "speculative_tok_s": round(speculative_rate, 2),
                        "tokens_per_forward": report["tokens_per_forward"], "same_text": same})
    ratios = [r["speculative_tok_s"] / r["plain_tok_s"] for r in results]
    return {"prompts": results, "speedup": round(statistics.mean(ratios), 3)}


async def bench_prefix(runtime: Any, programs: dict[str, str], sizes: Sizes,
                       count_tokens: Callable[[str], int]) -> dict[str, Any]:
    repeat = max(1, round(sizes.shared_tokens / count_tokens(SHARED_PROMPT)))
    shared = SHARED_PROMPT * repeat
    program = programs["prefix-caching"]
    args = ["--prefix", shared, "--max-tokens", 1, "--name", "bench.prefix"]
    question = "Question: when do you open on Saturday?"
    build = await run_program(runtime, program, *args, question)  # makes the export
    cached, unshared = await alternate(
        sizes.repeats,
        partial(run_program, runtime, program, *args, question),
        partial(run_program, runtime, program, *args, "--no-cache", question),
    )
    await run_program(runtime, program, *args, "--unexport", question)
    ratio = median_seconds(unshared) / median_seconds(cached)
    log(f"  {build.report()['prefix_tokens']}-token prefix: TTFT cached "
        f"{median_seconds(cached) * 1e3:.0f} ms, unshared {median_seconds(unshared) * 1e3:.0f} "
        f"ms (x{ratio:.2f}); building the export took {build.seconds * 1e3:.0f} ms")
    return {"prefix_tokens": build.report()["prefix_tokens"],
            "ttft_cached_ms": round(median_seconds(cached) * 1e3, 1),
            "ttft_unshared_ms": round(median_seconds(unshared) * 1e3, 1),
            "build_ms": round(build.seconds * 1e3, 1), "speedup": round(ratio, 3)}


async def bench_skeleton(runtime: Any, programs: dict[str, str], sizes: Sizes,
                         quick: bool) -> dict[str, Any]:
    args = ["--points", sizes.points, "--point-tokens", sizes.point_tokens]
    if quick:  # the tiny model writes no outline worth parsing
        args += ["--outline", "|".join(f"point {i + 1}" for i in range(sizes.points))]
    program = programs["skeleton-of-thought"]
    together, alone = await alternate(
        sizes.repeats,
        partial(run_program, runtime, program, *args, QUESTION),
        partial(run_program, runtime, program, *args, "--sequential", QUESTION),
    )
    ratio = median_seconds(alone) / median_seconds(together)
    points = together[-1].report()["points"]
    log(f"  {points} points: parallel {median_seconds(together):.2f} s, one after another "
        f"{median_seconds(alone):.2f} s (x{ratio:.2f})")
    return {"points": points, "parallel_s": round(median_seconds(together), 3),
            "sequential_s": round(median_seconds(alone), 3), "speedup": round(ratio, 3)}


async def bench_tree(runtime: Any, programs: dict[str, str], sizes: Sizes) -> dict[str, Any]:
    args = ["--breadth", sizes.points, "--keep", 2, "--depth", 2, "--thought-tokens",
            sizes.point_tokens, "--ignore-eos", QUESTION]
    program = programs["tree-of-thought"]
    together, alone = await alternate(
        sizes.repeats,
        partial(run_program, runtime, program, *args),
        partial(run_program, runtime, program, "--sequential", *args),
    )
    ratio = median_seconds(alone) / median_seconds(together)
    forks = together[-1].report()["forks"]
    log(f"  {forks} thoughts: levels in parallel {median_seconds(together):.2f} s, one after "
        f"another {median_seconds(alone):.2f} s (x{ratio:.2f})")
    return {"forks": forks, "parallel_s": round(median_seconds(together), 3),
            "sequential_s": round(median_seconds(alone), 3), "speedup": round(ratio, 3)}


async def bench_sink(runtime: Any, programs: dict[str, str], sizes: Sizes,
                     page_size: int) -> dict[str, Any]:
    budget_tokens = sizes.budget_pages * page_size
    rates = {}
    for times in (1, 4):
        tokens = times * budget_tokens
        args = ["--budget", sizes.budget_pages, "--max-tokens", tokens, "--ignore-eos",
                SINK_PROMPT]
        runs = [await run_program(runtime, programs["attention-sink"], *args)
                for _ in range(sizes.repeats)]
        rates[times] = tokens / median_seconds(runs)
        log(f"  {times}x the budget ({tokens} tokens, {sizes.budget_pages} pages): "
            f"{rates[times]:.1f} tok/s, peak {runs[-1].report()['peak_pages']} pages")
    return {"budget_pages": sizes.budget_pages, "tok_s_1x": round(rates[1], 2),
            "tok_s_4x": round(rates[4], 2), "ratio_4x_to_1x": round(rates[4] / rates[1], 3)}


# One short run per program, so the first measured run pays no first-launch costs.
WARM_UP_ARGS = {
    "text-completion": ["--max-tokens", 1, "Hi"],
    "speculative-decoding": ["--max-tokens", 1, "Hi"],
    "prefix-caching": ["--no-cache", "--prefix", "Hi", "--max-tokens", 1, "Hi"],
    "skeleton-of-thought": ["--outline", "a", "--point-tokens", 1, "Hi"],
    "attention-sink": ["--max-tokens", 1, "Hi"],
    "tree-of-thought": ["--breadth", 1, "--depth", 1, "--thought-tokens", 1, "Hi"],
}


async def warm_up(runtime: Any, programs: dict[str, str]) -> None:
    for name in PROGRAMS:
        await run_program(runtime, programs[name], *WARM_UP_ARGS[name])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from pie_trio.runtime.programs import ProgramStore
    from pie_trio.stack import load_runner, open_stack

    sizes = QUICK if args.quick else FULL
    model = "tiny" if args.quick else args.model
    log("building the inferlets ...")
    modules = build_modules()
    log(f"loading {model} ...")
    runner = load_runner(model, device=args.device, num_pages=args.pages)
    store = ProgramStore(memory_only=True)
    programs = {name: store.add(modules[name].read_bytes()) for name in PROGRAMS}
    record: dict[str, Any] = {"model": runner.info.name, "quick": args.quick,
                              "repeats": sizes.repeats}
    async with open_stack(runner, programs=store) as stack:
        runtime = stack.runtime
        log("warming up (one short run of each program) ...")
        await warm_up(runtime, programs)
        log("speculative decoding against plain greedy decoding (batch 1):")
        record["speculative"] = await bench_speculative(runtime, programs, sizes)
        log("prefix caching against prefilling the shared prompt every time:")
        record["prefix_caching"] = await bench_prefix(
            runtime, programs, sizes, lambda text: len(runner.tokenizer.encode(text)))
        log("skeleton-of-thought against expanding its points one after another:")
        record["skeleton_of_thought"] = await bench_skeleton(runtime, programs, sizes, args.quick)
        log("tree-of-thought against generating each level's thoughts one after another:")
        record["tree_of_thought"] = await bench_tree(runtime, programs, sizes)
        log("attention sink at 1x and 4x its KV budget:")
        record["attention_sink"] = await bench_sink(runtime, programs, sizes,
                                                    runner.info.page_size)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints progress to stderr and a JSON record as the last line of stdout.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model and small sizes: a smoke run")
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the model's pick)")
    parser.add_argument("--pages", type=int, default=1024, help="KV pages (default 1024)")
    parser.add_argument("--json", type=Path, help="also write the JSON record to this file")
    args = parser.parse_args(argv)
    record = trio.run(main_async, args)
    text = json.dumps(record)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
