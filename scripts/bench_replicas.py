#!/usr/bin/env python3
"""Output tokens/s of 1 vs 2 (or more) `pie-trio serve` replicas behind HAProxy, same load.

For each replica count, scripts/replicas.py starts the replicas behind deploy/haproxy.cfg; after
a warm-up, `--repeats` rounds each send `--requests` streaming /v1/completions (`--output-len`
tokens each, `ignore_eos`, greedy) with at most `--clients` in flight, measured as
scripts/bench_serve.py measures a level. Reports the median output throughput per replica count
and its ratio to one replica. Replicas share the machine: on a host with few cores they compete
for the same CPUs (set OMP_NUM_THREADS to split them), so expect little gain there. Prints a
table and a JSON record (also written with --json).

    python scripts/bench_replicas.py --model default --clients 16 --output-len 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402
import httpx  # noqa: E402
import replicas  # noqa: E402
import trio  # noqa: E402


async def measure_rounds(url: str, args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """The level records of every round against the balancer at `url`."""
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as http:
        model = await bench_serve.served_model(http)
        # Every replica compiles its built-in and touches its weights before the clock starts.
        warm = bench_serve.make_prompts(2 * count, 8, args.seed)
        await bench_serve.run_level(http, model, warm, 4, len(warm))
        rounds = []
        for round_index in range(args.repeats):
            prompts = bench_serve.make_prompts(args.requests, args.input_len,
                                               args.seed + round_index)
            results, duration = await bench_serve.run_level(http, model, prompts,
                                                            args.output_len, args.clients)
            record = bench_serve.level_record(args.clients, results, duration)
            bench_serve.progress(f"  {count} replica(s), round {round_index + 1}: "
                                 f"{record['output_throughput']:.1f} tok/s, "
                                 f"{record['failed']} failed")
            rounds.append(record)
        return rounds


def run_count(args: argparse.Namespace, count: int) -> dict[str, Any]:
    bench_serve.progress(f"starting {count} replica(s) of model={args.model} behind HAProxy")
    with replicas.running_replicas(count, args.model) as cluster:
        rounds = trio.run(measure_rounds, cluster.http, args, count)
    throughputs = [r["output_throughput"] for r in rounds]
    return {"replicas": count, "median_output_throughput": statistics.median(throughputs),
            "output_throughputs": throughputs,
            "failed": sum(r["failed"] for r in rounds),
            "errors": sorted({e for r in rounds for e in r["errors"]})[:3],
            "median_ttft_ms": statistics.median(r["ttft"]["median_ms"] for r in rounds),
            "median_tpot_ms": statistics.median(r["tpot"]["median_ms"] for r in rounds)}


def print_table(runs: list[dict[str, Any]]) -> None:
    base = runs[0]["median_output_throughput"]
    print(f"{'replicas':>8} {'out tok/s (median)':>19} {'vs first':>9} {'TTFT ms':>8} "
          f"{'TPOT ms':>8} {'failed':>6}")
    for run in runs:
        ratio = run["median_output_throughput"] / base if base else float("nan")
        print(f"{run['replicas']:>8} {run['median_output_throughput']:>19.1f} {ratio:>8.2f}x "
              f"{run['median_ttft_ms']:>8.0f} {run['median_tpot_ms']:>8.1f} {run['failed']:>6}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="each replica's model")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2],
                        help="replica counts to compare, the first is the base (default: 1 2)")
    parser.add_argument("--clients", type=int, default=16,
                        help="requests in flight at once (default: 16)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per round (default: 2 x --clients)")
    parser.add_argument("--input-len", type=int, default=32,
                        help="prompt length in words (default: 32)")
    parser.add_argument("--output-len", type=int, default=64,
                        help="tokens per response (default: 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per replica count; the median is reported (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the prompts (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON record here")
    args = parser.parse_args()
    args.requests = args.requests or 2 * args.clients
    return args


def main() -> int:
    args = parse_args()
    runs = [run_count(args, count) for count in args.replicas]
    base = runs[0]["median_output_throughput"]
    record = {"benchmark": "replicas", "balancer": "haproxy", "model": args.model,
              "clients": args.clients, "requests_per_round": args.requests,
              "input_words": args.input_len, "output_len": args.output_len,
              "repeats": args.repeats,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "runs": runs,
              "ratio": {str(r["replicas"]): r["median_output_throughput"] / base if base else None
                        for r in runs}}
    print_table(runs)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(record, file, indent=2)
    return 0 if all(run["failed"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
