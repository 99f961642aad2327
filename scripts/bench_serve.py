#!/usr/bin/env python3
"""Serving benchmark over /v1/completions (streaming), measured the way `vllm bench serve` does.

For each concurrency level (default 1, 8 and 32) a seeded set of prompts is sent with
`stream: true`, at most C requests in flight at once (requests are issued as fast as the limit
allows, like `--request-rate inf --max-concurrency C`). Per request the client records:

- TTFT: time from sending the request to the first streamed text;
- ITL: the time between consecutive streamed text chunks;
- TPOT: (E2E - TTFT) / (output tokens - 1), time per output token after the first;
- E2E: time from sending the request to the end of the stream;

with output tokens taken from the response's usage (`stream_options.include_usage`). Every
request asks for exactly `--output-len` tokens (`ignore_eos`, as vLLM's random dataset does),
greedy. Reports mean / median / p99 of each, request throughput and output-token throughput over
the wall time of the level, and output throughput relative to concurrency 1 (the gain from
batching). The server is started as a subprocess (`pie-trio serve` on a free port) unless
`--url` points at a running one. Prints a table and a JSON record (also written with --json).

    python scripts/bench_serve.py --quick
    python scripts/bench_serve.py --url http://127.0.0.1:8080 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import trio

WORDS = ("time river light stone market garden winter letter music engine village story "
         "window bridge forest number paper silver morning harbor signal doctor summer "
         "mountain teacher planet kitchen thunder orchard lantern compass").split()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def make_prompts(count: int, words: int, seed: int) -> list[str]:
    """Seeded prompts of `words` words each (roughly as many tokens)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


# -- one request --------------------------------------------------------------------------------


async def stream_completion(http: httpx.AsyncClient, model: str, prompt: str,
                            output_len: int, started: float | None = None) -> Result:
    """One streamed completion. A pooled connection the server closed just before the request
    was sent (a keep-alive limit: llama-server closes a connection after a few requests) is
    retried once on a new one, as HTTP clients do; the time lost counts against the server."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    result = Result(ok=False)
    first_attempt = started is None
    started = time.perf_counter() if started is None else started
    last = None
    answered = False
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            answered = True
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        if first_attempt and not answered and isinstance(exc, httpx.RemoteProtocolError):
            return await stream_completion(http, model, prompt, output_len, started)
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - started
    result.ok = last is not None
    return result


async def run_level(http: httpx.AsyncClient, model: str, prompts: list[str], output_len: int,
                    concurrency: int) -> tuple[list[Result], float]:
    limiter = trio.Semaphore(concurrency)
    results: list[Result] = []

    async def one(prompt: str) -> None:
        async with limiter:
            results.append(await stream_completion(http, model, prompt, output_len))
            if len(results) % max(1, len(prompts) // 4) == 0:
                progress(f"  c={concurrency}: {len(results)}/{len(prompts)} done")

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for prompt in prompts:
            nursery.start_soon(one, prompt)
    return results, time.perf_counter() - started


# -- statistics ---------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean_ms": 1000 * statistics.fmean(values),
            "median_ms": 1000 * statistics.median(values), "p99_ms": 1000 * p99}


def level_record(concurrency: int, results: list[Result], duration: float) -> dict:
    good = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in good)
    return {
        "concurrency": concurrency,
        "completed": len(good),
        "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in good),
        "total_output_tokens": output,
        "request_throughput": len(good) / duration,
        "output_throughput": output / duration,
        "ttft": summary([r.ttft for r in good]),
        "tpot": summary([t for r in good if (t := r.tpot) is not None]),
        "itl": summary([x for r in good for x in r.itl]),
        "e2e": summary([r.e2e for r in good]),
    }


def print_table(levels: list[dict]) -> None:
    base = levels[0]["output_throughput"] if levels else 0
    print(f"{'conc':>4} {'done':>5} {'req/s':>7} {'out tok/s':>10} {'vs c=1':>7} "
          f"{'TTFT mean/med/p99 ms':>22} {'TPOT mean/med/p99 ms':>22} "
          f"{'ITL mean/med/p99 ms':>22} {'E2E mean/med/p99 ms':>24}")
    for level in levels:
        ratio = level["output_throughput"] / base if base else float("nan")
        cells = " ".join(_cell(level[name], 24 if name == "e2e" else 22)
                         for name in ("ttft", "tpot", "itl", "e2e"))
        print(f"{level['concurrency']:>4} {level['completed']:>5} "
              f"{level['request_throughput']:>7.2f} {level['output_throughput']:>10.1f} "
              f"{ratio:>6.2f}x {cells}")


def _cell(stats: dict[str, float], width: int) -> str:
    return f"{stats['mean_ms']:.0f}/{stats['median_ms']:.0f}/{stats['p99_ms']:.0f}".rjust(width)


# -- the server ---------------------------------------------------------------------------------


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """`pie-trio serve` on a free port; returns the process and its HTTP base URL."""
    command = [sys.executable, "-m", "pie_trio", "serve", "--model", model, "--http-port", "0",
               "--tcp-port", "off", "--log-level", "warning"]
    progress(f"starting: {' '.join(command[1:])}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("pie-trio serving http://"):
            return process, line.split()[2]
    raise RuntimeError(f"the server exited with {process.wait()} before listening")


async def served_model(http: httpx.AsyncClient) -> str:
    response = await http.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def benchmark(args: argparse.Namespace, url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as http:
        model = await served_model(http)
        progress(f"model: {model}; warming up")
        await stream_completion(http, model, "warm up", 4)
        levels = []
        for concurrency in args.concurrency:
            count = args.num_prompts or max(args.min_prompts, 2 * concurrency)
            prompts = make_prompts(count, args.input_len, args.seed + concurrency)
            progress(f"concurrency {concurrency}: {count} requests, {args.input_len} words in, "
                     f"{args.output_len} tokens out")
            results, duration = await run_level(http, model, prompts, args.output_len,
                                                concurrency)
            levels.append(level_record(concurrency, results, duration))
    return {"benchmark": "serve", "endpoint": "/v1/completions", "stream": True, "model": model,
            "input_words": args.input_len, "output_len": args.output_len, "seed": args.seed,
            "quick": args.quick, "machine": {"platform": platform.platform(),
                                             "cpus": os.cpu_count()},
            "levels": levels}


def measure(url: str, *, concurrency: list[int], input_len: int = 128, output_len: int = 128,
            num_prompts: int | None = None, min_prompts: int = 16, seed: int = 0,
            api_key: str | None = None, quick: bool = False) -> dict:
    """The benchmark's JSON record for the running OpenAI-compatible server at `url`.

    For other scripts (e.g. bench_vs_llamacpp.py): the same measurement as this script's CLI,
    with its options as keywords.
    """
    args = argparse.Namespace(concurrency=concurrency, input_len=input_len,
                              output_len=output_len, num_prompts=num_prompts,
                              min_prompts=min_prompts, seed=seed, api_key=api_key, quick=quick)
    return trio.run(benchmark, args, url)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="HTTP base URL of a running server (default: start one)")
    parser.add_argument("--model", default="default",
                        help="model for the server this script starts (default: default)")
    parser.add_argument("--api-key", default=os.environ.get("PIE_TRIO_API_KEY"),
                        help="API key, if the server requires one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="most requests in flight at once, one run per value "
                             "(default: 1 8 32)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per level (default: max(--min-prompts, 2 x concurrency))")
    parser.add_argument("--min-prompts", type=int, default=16,
                        help="see --num-prompts (default: 16)")
    parser.add_argument("--input-len", type=int, default=128,
                        help="prompt length in words (default: 128)")
    parser.add_argument("--output-len", type=int, default=128,
                        help="tokens per response (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompts (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 32-word prompts, 32-token outputs, 8 requests min")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON record here")
    args = parser.parse_args()
    if args.quick:
        args.input_len, args.output_len, args.min_prompts = 32, 32, 8
    return args


def main() -> int:
    args = parse_args()
    process = None
    url = args.url
    if url is None:
        process, url = start_server(args.model)
    try:
        record = trio.run(benchmark, args, url)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print_table(record["levels"])
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(record, file, indent=2)
    return 0 if all(level["failed"] == 0 for level in record["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
