#!/usr/bin/env python3
"""GPU benchmark of the raw kernels, in one run:

1. the paged decode attention kernel's achieved bandwidth (K/V bytes read per second) as a
   fraction of the device's HBM bandwidth, at several batch sizes and context lengths;
2. decode tokens/s at 1/8/32/128 sequences: the torch path (`ModelRunner.logits`, kernels
   off), the raw kernels replayed as CUDA graphs (`DecodeGraphs`), and transformers `generate`
   on the same weights and dtype.

    python scripts/bench_gpu.py            # full
    python scripts/bench_gpu.py --quick    # a smaller run for a check
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from functools import partial

import torch

from pie_trio.kernels.dispatch import Kernels, PagedContext, select
from pie_trio.model import ModelRunner
from pie_trio.model.calls import Forward
from pie_trio.model.cuda_graphs import DecodeGraphs, TorchGraphBackend
from pie_trio.model.weights import default_model_path

CUDA = torch.device("cuda")
# Peak HBM bandwidth by device name, GB/s (vendor figures); --hbm-gbps overrides.
HBM_GBPS = {
    "H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "RTX 4090": 1008.0,
}  # fmt: skip


def hbm_gbps(override: float | None) -> float:
    if override:
        return override
    name = torch.cuda.get_device_name()
    for key, value in HBM_GBPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown HBM bandwidth for {name!r}: pass --hbm-gbps")


def gpu_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, by CUDA events over `repeats` calls after a warm-up."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def attention_bandwidth(kernels: Kernels, args: argparse.Namespace) -> list[dict]:
    heads, kv_heads, d, page_size = 32, 8, 128, 16  # a Llama-3-8B layer
    rows = []
    peak = hbm_gbps(args.hbm_gbps)
    for batch in args.attention_batch:
        for context in args.context:
            pages = context // page_size
            pool = batch * pages
            k = torch.randn(kv_heads, pool * page_size, d, device=CUDA, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            table = torch.randperm(pool, device=CUDA).view(batch, pages)
            lengths = torch.full((batch,), context, dtype=torch.int32, device=CUDA)
            ctx = PagedContext(table, page_size, 0, lengths, context)
            q = torch.randn(batch, heads, d, device=CUDA, dtype=torch.bfloat16)
            attend = partial(kernels.paged_attention, q, k, v, ctx, batch, 1, None, False, d**-0.5)
            seconds = gpu_time(attend, args.repeats)
            gbps = 2 * batch * context * kv_heads * d * 2 / seconds / 1e9
            rows.append({"batch": batch, "context": context, "us": round(seconds * 1e6, 1),
                         "gbps": round(gbps, 1), "hbm_fraction": round(gbps / peak, 3)})
            print(f"attention batch {batch:4d} context {context:6d}: {seconds * 1e6:8.1f} us "
                  f"{gbps:7.1f} GB/s = {gbps / peak:5.1%} of HBM", flush=True)
            del k, v
    return rows


def decode_calls(runner: ModelRunner, batch: int, prompt_len: int, steps: int) -> list[Forward]:
    """Prefill `batch` random prompts on scattered pages; return their first decode step."""
    page_size = runner.info.page_size
    rng = random.Random(batch)
    each = -(-(prompt_len + steps + 1) // page_size)
    order = list(range(batch * each))
    rng.shuffle(order)
    calls = []
    for b in range(batch):
        prompt = [rng.randrange(256, runner.info.vocab_size) for _ in range(prompt_len)]
        calls.append(Forward(owner="bench", kv_pages=order[b * each : b * each + each],
                             last_page_len=0, positions=list(range(prompt_len)), tokens=prompt,
                             output_indices=[prompt_len - 1]))  # fmt: skip
    runner.logits([with_length(c, prompt_len, page_size) for c in calls])
    return [with_length(c, prompt_len + 1, page_size, [c.tokens[-1]]) for c in calls]  # type: ignore[index]


def with_length(call: Forward, length: int, page_size: int, tokens: list[int] | None = None):  # type: ignore[no-untyped-def]
    new = tokens if tokens is not None else call.tokens
    assert new is not None
    return Forward(owner=call.owner, kv_pages=call.kv_pages[: -(-length // page_size)],
                   last_page_len=(length - 1) % page_size + 1,
                   positions=list(range(length - len(new), length)), tokens=new,
                   output_indices=[len(new) - 1])  # fmt: skip


def decode_rate(step: Callable[[list[Forward]], torch.Tensor], first: list[Forward],
                prompt_len: int, steps: int, page_size: int) -> float:
    calls = first
    step(calls)  # warm up (and capture)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        next_tokens = step(calls).argmax(dim=-1).tolist()
        calls = [with_length(c, prompt_len + i + 2, page_size, [t])
                 for c, t in zip(calls, next_tokens, strict=True)]  # fmt: skip
    return len(first) * steps / (time.perf_counter() - start)


def transformers_rate(hf, batch: int, prompt_len: int, steps: int, vocab: int) -> float:  # type: ignore[no-untyped-def]
    rng = random.Random(batch)
    ids = torch.tensor([[rng.randrange(256, vocab) for _ in range(prompt_len)]
                        for _ in range(batch)], device=CUDA)  # fmt: skip

    def timed(new: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                    min_new_tokens=new, do_sample=False)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(2)
        return batch * steps / (timed(steps + 1) - timed(1))


def decode_throughput(args: argparse.Namespace) -> list[dict]:
    prompt, steps = args.prompt_len, args.steps
    num_pages = max(args.batch) * (-(-(prompt + steps + 2) // 16)) + 1
    runner = ModelRunner.load("default", device="cuda", dtype="bf16", num_pages=num_pages)
    graphs = DecodeGraphs(runner.model, runner.kv, select(CUDA, enabled=True), TorchGraphBackend(),
                          max_context=prompt + steps + 16)  # fmt: skip
    hf = None
    if not args.no_transformers:
        import transformers

        path = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.bfloat16
        ).to(CUDA).eval()

    def graphed(calls: list[Forward]) -> torch.Tensor:
        logits = graphs.logits(calls)
        assert logits is not None, "a plain decode step must fit a captured graph"
        return logits

    rows = []
    for batch in args.batch:
        rates = {}
        for label, step in (("torch", runner.logits), ("kernels+graphs", graphed)):
            first = decode_calls(runner, batch, prompt, steps)
            rates[label] = decode_rate(step, first, prompt, steps, runner.info.page_size)
        if hf is not None:
            rates["transformers"] = transformers_rate(hf, batch, prompt, steps,
                                                      runner.info.vocab_size)  # fmt: skip
        rows.append({"batch": batch} | {k: round(v, 1) for k, v in rates.items()})
        print(f"decode batch {batch:4d}: " + "   ".join(f"{k} {v:9.1f} tok/s"
                                                       for k, v in rates.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps")
    parser.add_argument("--hbm-gbps", type=float, help="peak HBM bandwidth (default: by name)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", help="write the JSON record here")
    args = parser.parse_args()
    args.batch = [1, 8, 32, 128]
    args.attention_batch = [8, 32, 128] if args.quick else [1, 8, 32, 128]
    args.context = [1024, 4096] if args.quick else [512, 2048, 8192]
    args.repeats = 20 if args.quick else 100
    args.prompt_len, args.steps = (64, 16) if args.quick else (128, 64)

    kernels = select(CUDA, enabled=True)
    if not kernels.cuda:
        raise SystemExit(f"raw kernels unavailable: {kernels.reason}")
    record = {"device": torch.cuda.get_device_name(), "quick": args.quick,
              "attention": attention_bandwidth(kernels, args),
              "decode": decode_throughput(args)}  # fmt: skip
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)


if __name__ == "__main__":
    main()
