"""Agents next to the model vs agents driving it from outside: the same ReAct loop run (a) as
the agent-react inferlet, whose KV cache survives every tool call, and (b) as a client over
pie-trio's own OpenAI API, re-sending the whole transcript every turn.

    python scripts/bench_agents.py                        N = 1, 8, 32; K=8, T=16, D=100 ms
    python scripts/bench_agents.py --quick --model tiny   a smoke run: N = 1, 2; K=2, T=4

N agents run at once, each K tool calls of T generated tokens, the tool service answering
after D ms (scripts/tool_service.py, on 127.0.0.1). One server (`serve`, tool I/O allowed to
the tool service only) serves both sides. Per N and side: agents/s and p50/p99 episode
latency; then the ratio inferlet / client. The JSON record goes to stdout (and --out).
Target: the inferlet at least 2x the client-side loop at 8 and 32 agents.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio

from pie_trio.client import connect
from pie_trio.config import Config
from pie_trio.server.serve import serve
from pie_trio.stack import load_runner

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "inferlets" / "target" / "wasm" / "agent-react.wasm"
# The inferlet's prompt (inferlets/examples/agent-react/src/main.rs), rendered the same way.
SYSTEM = ("You answer questions with tools. Each turn, write one line 'Thought: ...' and then "
          "one line 'Action: TOOL[INPUT]', where TOOL is search (look a fact up), calc "
          "(arithmetic) or finish (give the final answer). The result comes back as "
          "'Observation: ...'.")
TASK = "What is the capital of France, and how many inhabitants does it have?"
ACTION = re.compile(r"Action:\s*(\w+)\s*\[([^\]]*)\]")


def _tool_service() -> Any:
    spec = importlib.util.spec_from_file_location("tool_service", ROOT / "scripts" /
                                                  "tool_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def inferlet_episode(ws_url: str, program: str, tools: str, k: int, t: int) -> float:
    started = time.perf_counter()
    async with connect(ws_url) as client:
        instance = await client.launch(program, ["--tools", tools, "--max-turns", str(k),
                                                 "--step-tokens", str(t), "--no-finish",
                                                 "--task", TASK])
        stderr: list[str] = []
        async for event in instance.events():
            if event.kind == "stderr":
                stderr.append(event.text or "")
            if event.kind == "terminated":
                if event.reason != "finished":
                    raise RuntimeError(f"agent ended {event.reason}: {event.detail}; stderr: "
                                       f"{''.join(stderr)[-500:]}")
                break
    return time.perf_counter() - started


async def client_episode(http: httpx.AsyncClient, api: str, tools: str, model: str, k: int,
                         t: int) -> float:
    """The same loop client-side: every turn sends the whole transcript again."""
    started = time.perf_counter()
    transcript = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{TASK}<|im_end|>\n"
                  "<|im_start|>assistant\nThought:")
    for _ in range(k):
        reply = await http.post(f"{api}/v1/completions", json={
            "model": model, "prompt": transcript, "max_tokens": t, "temperature": 0,
            "ignore_eos": True})
        reply.raise_for_status()
        text = reply.json()["choices"][0]["text"]
        match = ACTION.search(text)
        tool, argument = (match.group(1).lower(), match.group(2)) if match else ("search", TASK)
        path = f"calc?expr={quote(argument)}" if tool == "calc" else f"search?q={quote(argument)}"
        answer = (await http.get(f"{tools}/{path}")).json()
        observation = (answer.get("results") or [{"text": "no results"}])[0]["text"] \
            if "results" in answer else str(answer.get("result", answer.get("error")))
        transcript += f"{text}\nObservation: {observation[:300]}\nThought:"
    return time.perf_counter() - started


async def run_side(n: int, episode: Any) -> dict[str, float]:
    latencies: list[float] = []

    async def one() -> None:
        latencies.append(await episode())

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"agents_per_s": n / wall, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "wall_s": wall}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    runner = load_runner(args.model, num_pages=args.pages)
    tool_service = _tool_service()
    config = Config.load(env={}, overrides={
        "http_port": 0, "tcp_port": "off", "tool_io": True, "tool_allow": "127.0.0.1",
        "max_instances": 256, "max_instances_per_tenant": 256, "max_connections_per_peer": 256})
    record: dict[str, Any] = {"model": runner.info.name, "k": args.k, "t": args.t,
                              "tool_latency_ms": args.d, "runs": []}
    async with tool_service.open_tool_service(latency=args.d / 1000) as tools, \
            trio.open_nursery() as nursery:
        shutdown = trio.Event()
        addresses = await nursery.start(lambda task_status: serve(
            config, runner=runner, shutdown=shutdown, handle_signals=False,
            task_status=task_status))
        async with connect(addresses.ws) as client:
            program = await client.upload(AGENT.read_bytes())
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) \
                as http:
            for n in args.n:
                inferlet = await run_side(n, lambda: inferlet_episode(
                    addresses.ws, program, tools.url, args.k, args.t))
                client_side = await run_side(n, lambda: client_episode(
                    http, addresses.http, tools.url, runner.info.name, args.k, args.t))
                ratio = inferlet["agents_per_s"] / client_side["agents_per_s"]
                record["runs"].append({"n": n, "inferlet": inferlet, "client": client_side,
                                       "ratio": ratio})
                print(f"N={n:3d}  inferlet {inferlet['agents_per_s']:7.2f}/s "
                      f"p50 {inferlet['p50_s']:6.2f}s  client {client_side['agents_per_s']:7.2f}"
                      f"/s p50 {client_side['p50_s']:6.2f}s  ratio {ratio:.2f}x",
                      file=sys.stderr)
        shutdown.set()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--k", type=int, default=8, help="tool calls per episode")
    parser.add_argument("--t", type=int, default=16, help="tokens generated per step")
    parser.add_argument("--d", type=float, default=100.0, help="tool latency, ms")
    parser.add_argument("--pages", type=int, default=2048,
                        help="KV pages (default 2048: every inferlet agent keeps its whole "
                        "transcript's KV, 32 of them about 1,800 pages)")
    parser.add_argument("--quick", action="store_true", help="N = 1, 2; K = 2; T = 4")
    parser.add_argument("--out", help="also write the JSON record here")
    args = parser.parse_args()
    if args.quick:
        args.n, args.k, args.t = [1, 2], 2, 4
    if not AGENT.exists():
        sys.exit(f"{AGENT} is missing: python scripts/build_inferlets.py --no-install")
    record = trio.run(bench, args)
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
