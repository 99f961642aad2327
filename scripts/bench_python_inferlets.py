"""Benchmark Python inferlets against Rust ones: launch latency and per-token cost.

    python scripts/bench_python_inferlets.py            real model (SmolLM2-135M), full sizes
    python scripts/bench_python_inferlets.py --quick    tiny random model, small sizes

The same program twice: `inferlets/python/text_completion.py` (a component built with
`pie-trio build`, cached by the hash of its sources) and the built-in Rust `text-completion`
(a core module), greedy, --ignore-eos, on the server's stack (pie_trio/stack.py) in one process.

1. launch: launch to first streamed token and launch to end, for a program's first launch after
   it was uploaded and compiled (cold: its first instantiation) and for later launches (warm:
   the median). Compiling each program (the upload's cost, paid once) is reported beside.
2. per-token cost: the decode time per token (each sequence's first token to its last) at 1 and
   32 concurrent sequences; runs alternate between the two programs and the median is kept.

Targets: a warm Python launch (to the first token) within 50 ms, and a Python guest's decode
cost per token within 1.10x the Rust guest's. Progress and the ratios go to stderr; the last
line of stdout is one JSON record (also written to --json).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import blake3
import trio

ROOT = Path(__file__).resolve().parents[1]
PYTHON_SOURCE = ROOT / "inferlets" / "python" / "text_completion.py"
PROMPT = "Once upon a time"
WARM_LAUNCH_TARGET_MS = 50.0
PER_TOKEN_TARGET_RATIO = 1.10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def python_component() -> bytes:
    """text_completion.py built as a component, cached by the hash of its sources."""
    from pie_trio.cli.build import DEFAULT_SDK, DEFAULT_WIT, build
    from pie_trio.runtime.programs import default_cache_dir

    digest = blake3.blake3(PYTHON_SOURCE.read_bytes())
    for path in sorted([*DEFAULT_SDK.rglob("*.py"), *DEFAULT_WIT.rglob("*.wit")]):
        digest.update(path.read_bytes())
    output = default_cache_dir().parent / "bench-python-inferlets" / \
        f"text_completion-{digest.hexdigest()[:16]}.wasm"
    if not output.exists():
        log(f"building {PYTHON_SOURCE.name} (pie-trio build) ...")
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_suffix(".tmp")
        build(PYTHON_SOURCE, partial)
        partial.replace(output)
    return output.read_bytes()


class Timing:
    """One sequence: launch, first and last streamed token, end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.end = 0.0

    def token(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now

    @property
    def to_first_ms(self) -> float:
        assert self.first is not None
        return (self.first - self.start) * 1e3

    @property
    def to_end_ms(self) -> float:
        return (self.end - self.start) * 1e3


async def sequence(runtime, program: str, max_tokens: int) -> Timing:
    timing = Timing()
    instance = await runtime.launch(
        program, ["--prompt", PROMPT, "--max-tokens", str(max_tokens), "--ignore-eos"], "bench")
    last = None
    async for event in instance.events:
        if event["event"] == "message":
            timing.token()
        last = event
    assert last is not None and last.get("reason") == "finished", last
    timing.end = time.perf_counter()
    return timing


# -- 1. launch ------------------------------------------------------------------------------

async def bench_launch(runtime, programs: dict[str, str], max_tokens: int,
                       launches: int) -> dict:
    results = {}
    for name, program in programs.items():
        cold = await sequence(runtime, program, max_tokens)
        warm = [await sequence(runtime, program, max_tokens) for _ in range(launches)]
        results[name] = {
            "cold_to_first_token_ms": round(cold.to_first_ms, 2),
            "cold_to_end_ms": round(cold.to_end_ms, 2),
            "warm_to_first_token_ms": round(statistics.median(t.to_first_ms for t in warm), 2),
            "warm_to_end_ms": round(statistics.median(t.to_end_ms for t in warm), 2),
        }
        r = results[name]
        log(f"  {name:6s}: cold {r['cold_to_first_token_ms']:8.1f} ms to first token, "
            f"{r['cold_to_end_ms']:8.1f} ms to end; warm {r['warm_to_first_token_ms']:7.1f} ms "
            f"to first token, {r['warm_to_end_ms']:7.1f} ms to end")
    return results


# -- 2. per-token cost ----------------------------------------------------------------------

async def concurrently(count: int, make: Callable[[], Awaitable[Timing]]) -> list[Timing]:
    timings: list[Timing] = []

    async def one() -> None:
        timings.append(await make())

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return timings


def decode_per_token(timings: list[Timing], max_tokens: int) -> float:
    """Seconds per decoded token over all sequences at once (each one's first token aside)."""
    first = min(t.first for t in timings if t.first is not None)
    last = max(t.last for t in timings if t.last is not None)
    return (last - first) / (len(timings) * (max_tokens - 1))


async def bench_per_token(runtime, programs: dict[str, str], max_tokens: int,
                          sequences: tuple[int, ...], repeats: int) -> dict:
    results = {}
    for count in sequences:
        runs: dict[str, list[float]] = {name: [] for name in programs}
        for repeat in range(repeats):
            for name, program in programs.items():
                timings = await concurrently(
                    count, lambda program=program: sequence(runtime, program, max_tokens))
                runs[name].append(decode_per_token(timings, max_tokens))
            log(f"  {count:2d} sequences, run {repeat + 1}/{repeats}: " + ", ".join(
                f"{name} {runs[name][-1] * 1e3:.2f} ms/token" for name in programs))
        rust, python = (statistics.median(runs[name]) for name in ("rust", "python"))
        results[str(count)] = {"rust_ms_per_token": round(rust * 1e3, 3),
                               "python_ms_per_token": round(python * 1e3, 3),
                               "ratio": round(python / rust, 3)}
        log(f"  {count:2d} sequences: python/rust = {python / rust:.3f}x per token")
    return results


# -- main -----------------------------------------------------------------------------------

def compile_program(programs, wasm: bytes) -> tuple[str, float]:
    started = time.perf_counter()
    program = programs.add(wasm)
    return program, time.perf_counter() - started


async def measure(args: argparse.Namespace, runner) -> dict:
    from pie_trio.runtime.programs import ProgramStore
    from pie_trio.stack import open_stack

    store = ProgramStore(memory_only=True)
    component = python_component()
    log("compiling both programs (an upload's one-time cost) ...")
    rust_wasm = store.builtins["text-completion"].read_bytes()
    rust, rust_compile = await trio.to_thread.run_sync(compile_program, store, rust_wasm)
    python, python_compile = await trio.to_thread.run_sync(compile_program, store, component)
    programs = {"rust": rust, "python": python}
    gc.collect()
    gc.freeze()  # as a server does: what is alive now lives for good
    max_tokens = 16 if args.quick else args.max_tokens
    record: dict = {"model": runner.info.name, "device": runner.info.device,
                    "quick": args.quick, "max_tokens": max_tokens,
                    "component_bytes": len(component), "module_bytes": len(rust_wasm),
                    "compile_s": {"rust": round(rust_compile, 2),
                                  "python": round(python_compile, 2)}}
    async with open_stack(runner, programs=store) as stack:
        log(f"launch ({max_tokens} tokens, greedy; cold: first launch after the compile):")
        record["launch"] = await bench_launch(stack.runtime, programs, max_tokens,
                                              3 if args.quick else args.launches)
        log("per-token cost (decode, first token to last):")
        record["per_token"] = await bench_per_token(
            stack.runtime, programs, max_tokens, (1, 32), 1 if args.quick else args.repeats)
    record["targets"] = targets(record)
    return record


def targets(record: dict) -> dict:
    warm = record["launch"]["python"]["warm_to_first_token_ms"]
    ratios = {count: r["ratio"] for count, r in record["per_token"].items()}
    result = {"warm_launch_ms": warm, "warm_launch_ok": warm <= WARM_LAUNCH_TARGET_MS,
              "per_token_ratios": ratios,
              "per_token_ok": all(r <= PER_TOKEN_TARGET_RATIO for r in ratios.values())}
    log(f"targets: warm python launch {warm:.1f} ms (<= {WARM_LAUNCH_TARGET_MS:.0f}: "
        f"{'met' if result['warm_launch_ok'] else 'missed'}); python/rust per token "
        + ", ".join(f"{r:.3f}x at {c}" for c, r in ratios.items())
        + f" (<= {PER_TOKEN_TARGET_RATIO}: {'met' if result['per_token_ok'] else 'missed'})")
    return result


async def main_async(args: argparse.Namespace) -> dict:
    from pie_trio.stack import close_runner, load_runner

    model = "tiny" if args.quick else args.model
    log(f"loading model {model!r} ...")
    runner = load_runner(model, device="cpu", num_pages=args.pages)
    try:
        return await measure(args, runner)
    finally:
        close_runner(runner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints progress to stderr and a JSON record as the last line of stdout.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model, 16 tokens, one run each")
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens per sequence (default 64)")
    parser.add_argument("--launches", type=int, default=10,
                        help="warm launches per program (default 10)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs per sequence count; the median is kept")
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
