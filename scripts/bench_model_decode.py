#!/usr/bin/env python3
"""Decode speed of the model layer alone: `ModelRunner.forward` steps, no executor.

For each batch size B, B random prompts are prefilled in one ragged forward, then B sequences
decode greedily one token per step, all in one batch per step; tokens/s counts decoded tokens
over the decode steps' wall time. With --transformers, transformers `generate` runs the same
batches (equal lengths, no padding: its best case) on the same GGUF weights and dtype, and the
ratio is printed.

    python scripts/bench_model_decode.py --batch 1 8 32 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

from pie_trio.executor.calls import Forward, Sampler
from pie_trio.model import ModelRunner
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--transformers", action="store_true", help="also time HF generate")
    parser.add_argument("--json", help="write the JSON record here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    runner = ModelRunner.load(
        "default",
        device="cpu",
        dtype=args.dtype,
        num_pages=max(args.batch) * (-(-(args.prompt_len + args.steps) // 16)),
    )
    hf = None
    if args.transformers:
        import transformers

        path = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=runner.dtype
        ).eval()

    record = {
        "dtype": args.dtype,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "results": [],
    }
    decode_speed(runner, 1, 8, 4)  # warm up
    for batch in args.batch:
        ours = sorted(
            decode_speed(runner, batch, args.prompt_len, args.steps) for _ in range(args.repeats)
        )[args.repeats // 2]
        row = {"batch": batch, "tokens_per_s": round(ours, 1)}
        line = f"batch {batch:3d}: {ours:8.1f} tok/s"
        if hf is not None:
            theirs = transformers_speed(
                hf, batch, args.prompt_len, args.steps, runner.info.vocab_size
            )
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
