#!/usr/bin/env python3
"""pie-trio beside llama.cpp: the same GGUF, the same machine, one run.

llama.cpp is what a user would run instead on a CPU, so this compares against it directly:

1. Engine decode. llama.cpp's `llama-batched-bench` (B sequences of P random prompt tokens
   prefilled together, then G decode steps of B tokens each) against pie-trio's executor on the
   same workload: B `generate` calls (pie_trio/executor/direct.py, end-of-sequence ignored)
   sharing one Executor. Decode tok/s counts the tokens decoded after the last prompt is
   prefilled over the time to the last token (llama.cpp: B x G / T_TG); prefill tok/s is reported
   beside it. Defaults: P = G = 128, B = 1, 8, 32. llama-batched-bench feeds random tokens and
   samples nothing; pie-trio's figure includes its greedy sampling and executor scheduling.
2. HTTP serving. `llama-server -np 32 -c 16384` and `pie-trio serve`, one at a time (llama.cpp's
   threads busy-wait, so two servers at once would distort both), each measured exactly as
   scripts/bench_serve.py measures: streaming /v1/completions, 128-word prompts, 64 output tokens,
   ignore_eos, greedy, at 1, 8 and 32 clients; output tok/s and TTFT/TPOT/ITL medians and p99.

Ratios are pie-trio / llama.cpp: above 1 is better for pie-trio for throughputs, below 1 is
better for pie-trio for times (TTFT, TPOT, ITL). With --repeats N the engines alternate N times
and every figure is the median of N. The same thread count (--threads, default: every core)
goes to both. Compare only on an otherwise quiet machine: the load average is recorded.

llama.cpp is built once from the `llama-cpp-python` sdist on PyPI and cached outside the
repository (scripts/llama_cpp_build.py; needs cmake and g++, about 15 minutes on 2 cores). Without
those tools, or with --no-build and no build, the script says so and exits 0.

    python scripts/bench_vs_llamacpp.py --quick
    python scripts/bench_vs_llamacpp.py --repeats 3 --json vs-llamacpp.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Under the OpenMP wait policy pie-trio serves with (pie_trio/__init__.py), set before torch
# loads; llama.cpp's processes get the environment as the user gave it.
USER_ENV = dict(os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402
import httpx  # noqa: E402
import llama_cpp_build  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = ("auto", "int4", "bf16", "fp32")
DTYPES = ("bf16", "fp16", "fp32")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- engine decode: llama-batched-bench ---------------------------------------------------------


def llama_engine(llama: llama_cpp_build.LlamaCpp, gguf: str, args: argparse.Namespace) -> dict:
    """{B: {"prefill_tok_s", "decode_tok_s"}} from one llama-batched-bench run."""
    ctx = max(args.ctx, max(args.concurrency) * (args.prompt_len + args.gen_len))
    command = [llama.binary("llama-batched-bench"), "-m", gguf, "-c", str(ctx),
               "-npp", str(args.prompt_len), "-ntg", str(args.gen_len),
               "-npl", ",".join(map(str, args.concurrency)), "-t", str(args.threads)]
    progress(f"  llama.cpp: {' '.join(command[1:])}")
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=USER_ENV) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("|"):  # its table, a row per B as it is measured
                progress(f"    {line.rstrip()}")
    rows = parse_batched_bench("".join(lines))
    if process.returncode != 0 or set(rows) != set(args.concurrency):
        tail = "".join(lines[-10:]).rstrip()
        raise RuntimeError(f"llama-batched-bench failed ({process.returncode}):\n{tail}")
    return rows


def parse_batched_bench(text: str) -> dict[int, dict]:
    """The rows of llama-batched-bench's table, keyed by B (sequences)."""
    header, rows = None, {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 10:
            continue
        if "S_TG t/s" in cells:
            header = cells
        elif header and cells[0].isdigit():
            row = dict(zip(header, cells, strict=False))
            rows[int(row["B"])] = {"prefill_tok_s": float(row["S_PP t/s"]),
                                   "decode_tok_s": float(row["S_TG t/s"]),
                                   "prefill_s": float(row["T_PP s"]),
                                   "decode_s": float(row["T_TG s"])}
    return rows


# -- engine decode: pie-trio's executor ---------------------------------------------------------


def load_runner(gguf: str, args: argparse.Namespace):
    """pie-trio's ModelRunner for the GGUF, with --dtype / --weights when given."""
    import torch

    from pie_trio.model.runner import ModelRunner

    torch.set_num_threads(args.threads)
    options = {"dtype": args.dtype} if args.dtype else {}
    if args.weights:  # check_weights_option made sure ModelRunner.load takes it
        options["weights"] = args.weights
    return ModelRunner.load(gguf, device="cpu", **options)


async def pie_decode(runner, batch: int, prompt_len: int, gen_len: int, seed: int) -> dict:
    """`batch` sequences of `prompt_len` random tokens through one Executor, `gen_len` decode
    steps each after the token the prefill yields (what llama-batched-bench times)."""
    import trio

    from pie_trio.executor.direct import generate
    from pie_trio.executor.executor import Executor

    rng = random.Random(seed)
    vocab = runner.info.vocab_size
    prompts = [[rng.randrange(256, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    firsts: list[float] = []
    later: list[float] = []

    async def one(index: int) -> None:
        stream = generate(executor, prompts[index],
                          max_tokens=gen_len + 1, ignore_stop=True, owner=f"vs-llama-{index}")
        count = 0
        async with contextlib.aclosing(stream):
            async for _ in stream:
                (later if count else firsts).append(time.perf_counter())
                count += 1
        assert count == gen_len + 1, f"sequence {index} yielded {count} tokens"

    executor = Executor(runner)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        start = time.perf_counter()
        async with trio.open_nursery() as sequences:
            for index in range(batch):
                sequences.start_soon(one, index)
        nursery.cancel_scope.cancel()
    prefilled, end = max(firsts), max(later)
    decoded = sum(1 for stamp in later if stamp > prefilled)
    return {"prefill_tok_s": batch * prompt_len / (prefilled - start),
            "decode_tok_s": decoded / (end - prefilled),
            "prefill_s": prefilled - start, "decode_s": end - prefilled}


def pie_engine(runner, args: argparse.Namespace, repeat: int) -> dict:
    import trio

    rows = {}
    for batch in args.concurrency:
        progress(f"  pie-trio: {batch} sequences x ({args.prompt_len} prompt + "
                 f"{args.gen_len} decode) tokens")
        rows[batch] = trio.run(pie_decode, runner, batch, args.prompt_len, args.gen_len,
                               1000 * repeat + batch)
    return rows


def engine(llama: llama_cpp_build.LlamaCpp, gguf: str, args: argparse.Namespace) -> dict:
    """Both engines, alternating, --repeats times; medians per B."""
    import trio

    progress(f"engine decode: loading {Path(gguf).name} for pie-trio")
    runner = load_runner(gguf, args)
    progress("  pie-trio: warming up")
    trio.run(pie_decode, runner, max(args.concurrency), 16, 4, -1)
    runs: dict[str, list[dict]] = {"llama_cpp": [], "pie_trio": []}
    load: dict[str, list[float]] = {"llama_cpp": [], "pie_trio": []}
    for repeat in range(args.repeats):
        progress(f"engine decode, run {repeat + 1}/{args.repeats}")
        load["llama_cpp"].append(round(os.getloadavg()[0], 2))
        runs["llama_cpp"].append(llama_engine(llama, gguf, args))
        load["pie_trio"].append(round(os.getloadavg()[0], 2))
        runs["pie_trio"].append(pie_engine(runner, args, repeat))
    rows = []
    for batch in args.concurrency:
        row = {"concurrency": batch}
        for name, measured in runs.items():
            row[name] = median_of([run[batch] for run in measured])
            row[name]["decode_runs"] = [round(run[batch]["decode_tok_s"], 1) for run in measured]
        row["decode_ratio"] = ratio(row["pie_trio"]["decode_tok_s"],
                                    row["llama_cpp"]["decode_tok_s"])
        row["prefill_ratio"] = ratio(row["pie_trio"]["prefill_tok_s"],
                                     row["llama_cpp"]["prefill_tok_s"])
        rows.append(row)
    return {"prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "pie_trio_dtype": getattr(runner.info, "dtype", None) or args.dtype,
            "pie_trio_weights": getattr(runner.info, "weights", None) or args.weights,
            "loadavg_before_runs": load, "rows": rows}


# -- HTTP serving -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen, name: str) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        progress(f"  {name} ignored SIGTERM for 30 s: killing it")
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_server(name: str, command: list[str], port: int, env: dict, log: Path,
                   timeout: float = 300.0) -> Iterator[str]:
    """Start a server on loopback, wait for GET /health to answer 200, stop it on the way out
    (errors and Ctrl-C included). Yields its base URL."""
    url = f"http://127.0.0.1:{port}"
    progress(f"  starting {name}: {' '.join(command)}")
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(process, name, url, log, timeout)
        yield url
    finally:
        stop(process, name)
        progress(f"  {name} stopped (exit {process.returncode})")


def wait_healthy(process: subprocess.Popen, name: str, url: str, log: Path,
                 timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready; "
                               f"the end of {log}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s; the end of {log}:\n"
                       f"{log_tail(log)}")


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


def llama_server_command(llama: llama_cpp_build.LlamaCpp, gguf: str, port: int,
                         args: argparse.Namespace) -> list[str]:
    slots = max(32, max(args.concurrency))
    ctx = max(args.ctx, slots * 512)
    return [llama.binary("llama-server"), "-m", gguf, "-np", str(slots), "-c", str(ctx),
            "-t", str(args.threads), "--host", "127.0.0.1", "--port", str(port)]


def pie_server_command(gguf: str, port: int, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "pie_trio", "serve", "--host", "127.0.0.1",
               "--http-port", str(port), "--tcp-port", "off", "--model", gguf,
               "--log-level", "warning"]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.weights:
        command += ["--weights", args.weights]
    return command


def check_weights_option(args: argparse.Namespace) -> None:
    """Fail early when --weights is asked for but this pie-trio does not have it yet."""
    if not args.weights:
        return
    import inspect

    from pie_trio.model.runner import ModelRunner

    usage = subprocess.run([sys.executable, "-m", "pie_trio", "serve", "--help"],
                           capture_output=True, text=True).stdout
    if "--weights" not in usage and not args.skip_serve:
        raise SystemExit("--weights: this pie-trio's `serve` has no --weights option yet; "
                         "run without --weights (or with --skip-serve)")
    if "weights" not in inspect.signature(ModelRunner.load).parameters and not args.skip_engine:
        raise SystemExit("--weights: this pie-trio's ModelRunner.load has no `weights` option "
                         "yet; run without --weights (or with --skip-engine)")


def serve(llama: llama_cpp_build.LlamaCpp, gguf: str, args: argparse.Namespace,
          logs: Path) -> dict:
    """Both servers, one at a time, alternating, --repeats times; medians per level."""
    pie_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    runs: dict[str, list[dict]] = {"llama_cpp": [], "pie_trio": []}
    load: dict[str, list[float]] = {"llama_cpp": [], "pie_trio": []}
    for repeat in range(args.repeats):
        progress(f"HTTP serving, run {repeat + 1}/{args.repeats}")
        for name in runs:
            load[name].append(round(os.getloadavg()[0], 2))
            port = free_port()
            if name == "llama_cpp":
                command, env = llama_server_command(llama, gguf, port, args), USER_ENV
            else:
                command, env = pie_server_command(gguf, port, args), pie_env
            log = logs / f"{name}-{repeat + 1}.log"
            with running_server(name.replace("_", "-").replace("-cpp", ".cpp"), command, port,
                                env, log) as url:
                record = bench_serve.measure(
                    url, concurrency=args.concurrency, input_len=args.input_words,
                    output_len=args.output_len, min_prompts=args.min_prompts, seed=args.seed)
            runs[name].append(record)
    levels = []
    for index, concurrency in enumerate(args.concurrency):
        level = {"concurrency": concurrency}
        for name, records in runs.items():
            measured = [record["levels"][index] for record in records]
            level[name] = median_of(measured)
            level[name]["failed"] = sum(m["failed"] for m in measured)
            level[name]["errors"] = sorted({e for m in measured for e in m["errors"]})[:3]
        level["ratios"] = serve_ratios(level["pie_trio"], level["llama_cpp"])
        levels.append(level)
    return {"endpoint": "/v1/completions", "stream": True, "input_words": args.input_words,
            "output_len": args.output_len, "min_prompts": args.min_prompts,
            "llama_server": llama_server_command(llama, gguf, 0, args)[1:-2],
            "pie_trio_serve": pie_server_command(gguf, 0, args)[1:],
            "loadavg_before_runs": load, "levels": levels}


def serve_ratios(pie: dict, llama: dict) -> dict:
    ratios = {"output_throughput": ratio(pie["output_throughput"], llama["output_throughput"])}
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("median_ms", "p99_ms"):
            ratios[f"{metric}_{stat.removesuffix('_ms')}"] = ratio(pie[metric][stat],
                                                                  llama[metric][stat])
    return ratios


# -- figures ------------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float) -> float | None:
    if not denominator or numerator != numerator or denominator != denominator:
        return None
    return round(numerator / denominator, 3)


def median_of(records: list):
    """The element-wise median of like-shaped records (numbers); other values from the first."""
    first = records[0]
    if isinstance(first, dict):
        return {key: median_of([record[key] for record in records]) for key in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        return statistics.median(records)
    return first


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    memory = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cpu_features": sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*)", cpuinfo))),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None,
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


def versions(llama: llama_cpp_build.LlamaCpp) -> dict:
    import torch

    import pie_trio

    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    return {
        "pie_trio": pie_trio.__version__,
        "pie_trio_git": git.stdout.strip() or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llama_cpp": llama_cpp_build.version_of(llama.binary("llama-server")),
        "llama_cpp_build": llama.info,
        "llama_cpp_dir": str(llama.bin_dir),
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(record: dict) -> None:
    repeats = record["settings"]["repeats"]
    median = f", medians of {repeats} runs" if repeats > 1 else ""
    engine_part = record.get("engine")
    if engine_part:
        print(f"\nengine: {engine_part['prompt_len']}-token prompts, {engine_part['gen_len']} "
              f"decode steps, {record['settings']['threads']} threads, pie-trio weights "
              f"{engine_part['pie_trio_weights'] or '?'} / compute "
              f"{engine_part['pie_trio_dtype'] or '?'}, tok/s{median} "
              "(ratio = pie-trio / llama.cpp)")
        print(f"{'seqs':>5} | {'decode llama.cpp':>16} {'pie-trio':>9} {'ratio':>6} | "
              f"{'prefill llama.cpp':>17} {'pie-trio':>9} {'ratio':>6}")
        for row in engine_part["rows"]:
            llama, pie = row["llama_cpp"], row["pie_trio"]
            print(f"{row['concurrency']:>5} | {llama['decode_tok_s']:>16.1f} "
                  f"{pie['decode_tok_s']:>9.1f} {fmt(row['decode_ratio'], '.2f'):>5}x | "
                  f"{llama['prefill_tok_s']:>17.1f} {pie['prefill_tok_s']:>9.1f} "
                  f"{fmt(row['prefill_ratio'], '.2f'):>5}x")
    serve_part = record.get("serve")
    if serve_part:
        print(f"\nHTTP serving: streaming /v1/completions, {serve_part['input_words']}-word "
              f"prompts, {serve_part['output_len']} output tokens, ignore_eos{median}; times in "
              "ms as median/p99 (ratio = pie-trio / llama.cpp; for times, below 1 is faster)")
        print(f"{'conc':>4} {'server':<9} {'fail':>4} {'out tok/s':>9} {'TTFT':>13} "
              f"{'TPOT':>11} {'ITL':>11} {'E2E':>13}")
        for level in serve_part["levels"]:
            for name, label in (("llama_cpp", "llama.cpp"), ("pie_trio", "pie-trio")):
                stats = level[name]
                print(f"{level['concurrency']:>4} {label:<9} {stats['failed']:>4} "
                      f"{stats['output_throughput']:>9.1f} "
                      + " ".join(_times(stats[m], w) for m, w in
                                 (("ttft", 13), ("tpot", 11), ("itl", 11), ("e2e", 13))))
            r = level["ratios"]
            print(f"{'':>4} {'ratio':<9} {'':>4} {fmt(r['output_throughput'], '.2f') + 'x':>9} "
                  + " ".join(f"{fmt(r[m + '_median'], '.2f')}/{fmt(r[m + '_p99'], '.2f')}"
                             .rjust(w) for m, w in
                             (("ttft", 13), ("tpot", 11), ("itl", 11), ("e2e", 13))))


def print_load(record: dict) -> None:
    """The 1-minute load average before each run: above ~0.5 per core, distrust the figures."""
    cores = record["machine"]["cores"]
    parts = [f"{section} {name.replace('_cpp', '.cpp').replace('_', '-')} {values}"
             for section in ("engine", "serve") if section in record
             for name, values in record[section]["loadavg_before_runs"].items()]
    if parts:
        print(f"\nload average before each run ({cores} cores): " + "; ".join(parts))


def _times(stats: dict, width: int) -> str:
    return f"{stats['median_ms']:.0f}/{stats['p99_ms']:.0f}".rjust(width)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Engine decode tok/s (llama-batched-bench vs "
        "pie-trio's executor) and HTTP serving (llama-server vs pie-trio serve), with ratios "
        "pie-trio / llama.cpp (for times, below 1 means pie-trio is faster).",
        epilog="Building llama.cpp needs cmake and a C++ compiler: `apt-get install cmake g++` "
        "(Debian/Ubuntu). The build (about 15 minutes on 2 cores) is cached in "
        f"{llama_cpp_build.default_dir()} unless --llama-cpp-dir or $PIE_TRIO_LLAMA_CPP says "
        "otherwise; on a shared machine run it with `nice -n 19`. Example: python "
        "scripts/bench_vs_llamacpp.py --quick --json vs-llamacpp.json",
    )
    build = parser.add_argument_group("llama.cpp")
    build.add_argument("--llama-cpp-dir", metavar="DIR",
                       help="llama.cpp build/cache directory, or an existing build with "
                       "llama-server and llama-batched-bench in bin/ or build/bin/ (default: "
                       f"$PIE_TRIO_LLAMA_CPP, else {llama_cpp_build.default_dir()})")
    build.add_argument("--no-build", action="store_true",
                       help="never build llama.cpp: use a finished build or exit 0 saying so")
    build.add_argument("--build-jobs", type=int, default=None, metavar="J",
                       help="parallel compile jobs for the build (default: one per core)")
    build.add_argument("--build-only", action="store_true",
                       help="build (or find) llama.cpp, print where, and stop")
    pie = parser.add_argument_group("pie-trio")
    pie.add_argument("--weights", choices=WEIGHTS, default=None,
                     help="pie-trio's weight format, passed to `pie-trio serve --weights` and "
                     "ModelRunner.load (default: not passed, pie-trio's own default)")
    pie.add_argument("--dtype", choices=DTYPES, default=None,
                     help="pie-trio's compute dtype (default: not passed, pie-trio's choice for "
                     "the CPU)")
    work = parser.add_argument_group("workload")
    work.add_argument("--model", metavar="GGUF", default=None,
                      help="the GGUF both engines load (default: pie-trio's default model file)")
    work.add_argument("--quick", action="store_true",
                      help="a fast look: 1 and 8 sequences/clients, 64-token prompts and 32 "
                      "decode steps for the engine, 32-word prompts, 32 output tokens and 8 "
                      "requests minimum for serving")
    work.add_argument("--repeats", type=int, default=1, metavar="N",
                      help="alternate the engines N times and report medians (default: 1)")
    work.add_argument("--concurrency", type=int, nargs="+", default=None, metavar="C",
                      help="sequences (engine) and clients (serving) (default: 1 8 32; "
                      "--quick: 1 8)")
    work.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="threads for both engines, llama.cpp -t and torch threads (default: one "
                      "per core)")
    work.add_argument("--ctx", type=int, default=16384,
                      help="llama.cpp context size, -c (default: 16384; raised when the workload "
                      "needs more)")
    work.add_argument("--prompt-len", type=int, default=None,
                      help="engine prompt tokens per sequence (default: 128; --quick: 64)")
    work.add_argument("--gen-len", type=int, default=None,
                      help="engine decode steps per sequence (default: 128; --quick: 32)")
    work.add_argument("--input-words", type=int, default=None,
                      help="serving prompt length in words (default: 128; --quick: 32)")
    work.add_argument("--output-len", type=int, default=None,
                      help="serving output tokens per request (default: 64; --quick: 32)")
    work.add_argument("--min-prompts", type=int, default=None,
                      help="serving requests per level: max(this, 2 x clients) (default: 16; "
                      "--quick: 8)")
    work.add_argument("--seed", type=int, default=0, help="serving prompt seed (default: 0)")
    work.add_argument("--skip-engine", action="store_true", help="skip the engine comparison")
    work.add_argument("--skip-serve", action="store_true", help="skip the serving comparison")
    parser.add_argument("--logs", type=Path, metavar="DIR", default=None,
                        help="keep the servers' logs in DIR (default: a temporary directory, "
                        "removed at the end)")
    parser.add_argument("--json", type=Path, metavar="PATH", default=None,
                        help="write the JSON record (every figure, machine, versions) here")
    args = parser.parse_args(argv)
    defaults = {"concurrency": ([1, 8], [1, 8, 32]), "prompt_len": (64, 128),
                "gen_len": (32, 128), "input_words": (32, 128), "output_len": (32, 64),
                "min_prompts": (8, 16)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def default_gguf() -> str:
    from pie_trio.model.weights import default_model_path

    return str(default_model_path())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop servers
    try:
        llama = llama_cpp_build.ensure(args.llama_cpp_dir, build=not args.no_build,
                                       jobs=args.build_jobs)
    except llama_cpp_build.Unavailable as exc:
        progress(f"skipping the comparison: {exc}")
        return 0
    progress(f"llama.cpp: {llama.bin_dir}")
    if args.build_only:
        print(llama.bin_dir)
        return 0
    check_weights_option(args)
    gguf = str(Path(args.model).resolve()) if args.model else default_gguf()
    record = {"benchmark": "vs-llamacpp", "model": gguf,
              "settings": {key: value for key, value in vars(args).items()
                           if key not in ("json", "logs", "build_only")},
              "machine": machine(), "versions": versions(llama)}
    load = record["machine"]["loadavg_start"][0]
    if load > 0.5 * (os.cpu_count() or 1):
        progress(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work will "
                 "distort the figures (llama.cpp's most)")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-vs-llamacpp-")))
        logs.mkdir(parents=True, exist_ok=True)
        if not args.skip_engine:
            record["engine"] = engine(llama, gguf, args)
        if not args.skip_serve:
            record["serve"] = serve(llama, gguf, args, logs)
    record["machine"]["loadavg_end"] = os.getloadavg()
    record["seconds"] = round(time.monotonic() - started)
    print_tables(record)
    print_load(record)
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        progress(f"wrote {args.json}")
    failed = sum(level[name]["failed"] for level in record.get("serve", {}).get("levels", [])
                 for name in ("llama_cpp", "pie_trio"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
