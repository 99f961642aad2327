#!/usr/bin/env python3
"""Decode speed of the model layer alone: `ModelRunner.forward` steps, no executor.

For each batch size B, B random prompts are prefilled in one ragged forward, then B sequences
decode greedily one token per step, all in one batch per step; tokens/s counts decoded tokens
over the decode steps' wall time. With --transformers, transformers `generate` runs the same
batches (equal lengths, no padding: its best case) on the same GGUF weights and dtype, and the
ratio is printed.

--weights int4 runs the projections on the GGUF's Q4_1 blocks through torch's int4 kernel;
--dtype then names the compute dtype around them (default: the model layer's choice). Several
--weights values are compared in one process, their runs alternating (fairer on a busy machine
than separate invocations).

    python scripts/bench_model_decode.py --batch 1 8 32 --threads 2 --json out.json
    python scripts/bench_model_decode.py --weights int4 fp32 bf16 --batch 1 8 32
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

from pie_trio.model import ModelRunner
from pie_trio.model.calls import Forward, Sampler
from pie_trio.model.weights import default_model_path


def decode_speed(runner: ModelRunner, batch: int, prompt_len: int, steps: int) -> float:
    """Decoded tokens/s of `batch` sequences over `steps` greedy decode steps."""
    page_size = runner.info.page_size
    rng = random.Random(batch)
    pages_each = -(-(prompt_len + steps) // page_size)
    order = list(range(batch * pages_each))
    rng.shuffle(order)  # pages scattered over the pool, as a busy server would hand them out
    pages = [order[b * pages_each : (b + 1) * pages_each] for b in range(batch)]
    tokens = [
        [rng.randrange(256, runner.info.vocab_size) for _ in range(prompt_len)]
        for _ in range(batch)
    ]

    def step(new: list[list[int]], length: int) -> list[int]:
        calls = [
            Forward(
                owner="bench",
                kv_pages=pages[b][: -(-length // page_size)],
                last_page_len=(length - 1) % page_size + 1,
                positions=list(range(length - len(new[b]), length)),
                tokens=new[b],
                output_indices=[len(new[b]) - 1],
                sampler=Sampler(),
            )
            for b in range(batch)
        ]
        return [r.tokens[0] for r in runner.forward(calls)]

    last = step(tokens, prompt_len)
    start = time.perf_counter()
    for i in range(steps):
        last = step([[t] for t in last], prompt_len + i + 1)
    return batch * steps / (time.perf_counter() - start)


def transformers_speed(model, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    rng = random.Random(batch)
    ids = torch.tensor(
        [[rng.randrange(256, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    )
    mask = torch.ones_like(ids)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(2)  # warm up
        # The first new token comes from the prefill: time it alone and count only the
        # decode steps after it, as for pie-trio.
        prefill = timed(1)
        return batch * steps / (timed(steps + 1) - prefill)


def load_runners(args: argparse.Namespace) -> dict[str, ModelRunner]:
    """One runner per --weights value (or one dense runner in --dtype), by label."""
    num_pages = max(args.batch) * (-(-(args.prompt_len + args.steps) // 16))
    dtype = args.dtype
    if not args.weights and dtype is None:
        dtype = "bf16"  # what this script measured before it had --weights
    runners = {}
    for weights in args.weights or ["auto"]:
        runner = ModelRunner.load(
            "default", device="cpu", dtype=dtype, weights=weights, num_pages=num_pages
        )
        runners[f"{runner.info.weights}/{runner.info.dtype}"] = runner
    return runners


def medians(runners: dict[str, ModelRunner], batch: int, args: argparse.Namespace):
    """Median tokens/s of each runner; runs alternate between runners, so a machine whose load
    drifts (other processes on the cores) weighs on all of them alike."""
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(args.repeats):
        for label, runner in runners.items():
            samples[label].append(decode_speed(runner, batch, args.prompt_len, args.steps))
    return {label: sorted(rates)[args.repeats // 2] for label, rates in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                        help="compute dtype (default: bf16, or the model's choice with --weights)")
    parser.add_argument("--weights", nargs="+", choices=["auto", "int4", "bf16", "fp32"],
                        help="projection weights; several compare them, alternating runs "
                        "(default: dense in --dtype)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--transformers", action="store_true", help="also time HF generate")
    parser.add_argument("--json", help="write the JSON record here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    runners = load_runners(args)
    first = next(iter(runners.values()))
    hf = None
    if args.transformers:
        import transformers

        path = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=first.dtype
        ).eval()

    record = {
        "configs": list(runners),  # weights/dtype
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "results": [],
    }
    for runner in runners.values():
        decode_speed(runner, 1, 8, 4)  # warm up
    for batch in args.batch:
        rates = medians(runners, batch, args)
        row = {"batch": batch, "tokens_per_s": {k: round(v, 1) for k, v in rates.items()}}
        line = f"batch {batch:3d}: " + "   ".join(f"{k} {v:7.1f} tok/s" for k, v in rates.items())
        if hf is not None:  # against the first configuration
            ours = next(iter(rates.values()))
            theirs = transformers_speed(hf, batch, args.prompt_len, args.steps,
                                        first.info.vocab_size)
            row |= {"transformers_tokens_per_s": round(theirs, 1), "ratio": round(ours / theirs, 2)}
            line += f"   transformers {theirs:8.1f} tok/s   ratio {ours / theirs:5.2f}"
        print(line, flush=True)
        record["results"].append(row)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)


if __name__ == "__main__":
    main()
