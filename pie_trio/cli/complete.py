"""`pie-trio complete "PROMPT"`: generate straight from a local model, no server, no inferlet.

The model is loaded in this process, an executor runs in a trio nursery, and one direct
generation (pie_trio/executor/direct.py) streams its text to stdout as it is produced. A summary
(tokens, tokens/s) goes to stderr so that stdout holds nothing but the completion.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import TYPE_CHECKING, TextIO

import trio

from pie_trio.cli import Subparsers
from pie_trio.executor.direct import TextStream, generate
from pie_trio.executor.executor import Executor
from pie_trio.model.calls import CallError, Sampler

if TYPE_CHECKING:  # the runtime import waits for `load_model`: torch is only for this verb
    from pie_trio.model.runner import ModelRunner

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_parser(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "complete",
        help="complete a prompt with the local model (no server)",
        description=(
            "Load the model in this process and stream a completion of PROMPT to stdout; a "
            "one-line summary (tokens, tokens/s) goes to stderr. Generation stops at the "
            "model's end-of-turn token or after --max-tokens tokens. With temperature 0 "
            "(the default) decoding is greedy and deterministic."
        ),
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the text to complete")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="treat PROMPT as a user message: render it through the model's chat template "
        "and generate the assistant's answer",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=256, metavar="N",
        help="generate at most N tokens (default: 256)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T",
        help="sampling temperature; 0 means greedy (default: 0)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P",
        help="nucleus sampling: keep the most likely tokens up to probability mass P "
        "(0 < P <= 1; default: 1, no filter)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, metavar="S",
        help="seed for sampling, for reproducible output at temperature > 0 (default: random)",
    )
    parser.add_argument(
        "--model", default="default", metavar="M",
        help="'default' (SmolLM2-135M-Instruct), a .gguf file or a Hugging Face directory",
    )
    parser.add_argument(
        "--device", default=None, metavar="D",
        help="torch device such as cpu, cuda or cuda:1 (default: cuda when present, else cpu)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="weight and activation dtype (default: the model layer's choice for the device)",
    )
    parser.add_argument(
        "--weights", choices=["auto", "int4", "bf16", "fp32"], default="auto",
        help="projection weights: int4 runs a GGUF's Q4_0/Q4_1 blocks as they are (CPU only), "
        "bf16/fp32 dequantises them; auto: int4 on CPU for such files unless --dtype is given, "
        "else dense (default: auto)",
    )
    parser.set_defaults(func=run)


def run(
    args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if args.max_tokens < 0:
        print("pie-trio complete: --max-tokens must be >= 0", file=stderr)
        return 2
    try:
        runner = load_model(args.model, args.device, DTYPES.get(args.dtype), args.weights)
    except (OSError, ValueError) as exc:
        print(f"pie-trio complete: cannot load model {args.model!r}: {exc}", file=stderr)
        return 1
    sampler = Sampler(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        summary = trio.run(complete_to, runner, args.prompt, args.chat, args.max_tokens,
                           sampler, stdout)
    except CallError as exc:
        print(f"\npie-trio complete: {exc}", file=stderr)
        return 1
    print(summary, file=stderr)
    return 0


def load_model(
    model: str, device: str | None, dtype: str | None, weights: str = "auto"
) -> ModelRunner:
    """The `ModelRunner` for `model` (imported here: loading torch is only for this verb)."""
    from pie_trio.model.runner import ModelRunner

    return ModelRunner.load(model, device=device, dtype=dtype, weights=weights)


async def complete_to(
    runner: ModelRunner, prompt: str, chat: bool, max_tokens: int, sampler: Sampler, out: TextIO
) -> str:
    """Stream the completion of `prompt` to `out`; returns the summary line."""
    tokenizer = runner.tokenizer
    if chat:
        prompt = tokenizer.render_chat([{"role": "user", "content": prompt}])
    prompt_tokens = tokenizer.encode(prompt)
    executor = Executor(runner)
    text = TextStream(tokenizer.token_bytes())
    generated = 0
    first_token_s = 0.0
    error: CallError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        start = time.perf_counter()
        tokens = generate(
            executor, prompt_tokens, max_tokens=max_tokens, sampler=sampler, owner="complete"
        )
        try:
            async with contextlib.aclosing(tokens):
                async for token in tokens:
                    if generated == 0:
                        first_token_s = time.perf_counter() - start
                    generated += 1
                    out.write(text.push(token))
                    out.flush()
        except CallError as exc:
            error = exc  # raised below, outside the nursery, as itself (not in a group)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    out.write(text.flush() + "\n")
    out.flush()
    decode_rate = (generated - 1) / (elapsed - first_token_s) if generated > 1 else 0.0
    return (
        f"[{generated} tokens in {elapsed:.2f} s: {generated / max(elapsed, 1e-9):.1f} tok/s, "
        f"{decode_rate:.1f} tok/s decoding; prompt {len(prompt_tokens)} tokens, "
        f"first token after {first_token_s:.2f} s]"
    )
