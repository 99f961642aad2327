"""A small local tool service for agent tests and benchmarks: deterministic tools over HTTP.

    python scripts/tool_service.py --port 8900 --latency-ms 100

Tools (every answer is JSON; each tool call waits `latency` seconds first, like a remote API):

    GET  /search?q=WORDS      the corpus entries sharing most words with the query (top 3)
    GET  /calc?expr=EXPR      arithmetic (+ - * / // % ** and parentheses on numbers)
    POST /run  {"code": ...}  runs Python code in a subprocess with a time limit: stdout, stderr
                              and exit code (`timed_out` when it ran past the limit)

And for the tool-policy tests (no latency): `/redirect?to=URL` (302), `/bytes?n=N` (N bytes),
`/slow?ms=N` (answers after N ms, or notices the client hanging up: `aborted` counts those),
`/echo` (the request's method, headers and body). `/log` answers the log of tool calls.

Tests and the benchmark start it in their own nursery with `open_tool_service()`, which binds
127.0.0.1 on a free port. It runs on trio under hypercorn, like the server.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import hypercorn.config
import hypercorn.trio
import trio

CORPUS = {
    "paris": "Paris is the capital of France. It has 2100000 inhabitants.",
    "berlin": "Berlin is the capital of Germany. It has 3600000 inhabitants.",
    "rome": "Rome is the capital of Italy. It has 2800000 inhabitants.",
    "everest": "Mount Everest is the highest mountain on Earth, 8849 metres tall.",
    "nile": "The Nile is the longest river in Africa, 6650 kilometres long.",
    "python": "Python is a programming language created by Guido van Rossum in 1991.",
    "trio": "Trio is a Python library for structured concurrency with nurseries.",
    "moon": "The Moon orbits the Earth at an average distance of 384400 kilometres.",
}
RUN_TIME_LIMIT = 5.0  # seconds a /run program may take
MAX_BODY = 1 << 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class ToolService:
    """The tools, their latency and the log of calls; an ASGI application."""

    latency: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)  # one entry per tool call
    aborted: int = 0  # /slow requests whose client hung up before the answer
    in_flight: int = 0
    url: str = ""  # set once serving

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.log if tool is None or c["tool"] == tool]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        self.in_flight += 1
        try:
            await self._route(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        body = await _read_body(receive) if scope["method"] in ("POST", "PUT") else b""
        if path in ("/search", "/calc", "/run"):
            if await self._wait(self.latency, receive):
                answer = await self._tool(path[1:], query, body)
                await _send(send, 200, json.dumps(answer).encode())
        elif path == "/slow":
            if await self._wait(int(query.get("ms", "1000")) / 1000, receive):
                await _send(send, 200, b'{"slow": true}')
        elif path == "/redirect":
            await _send(send, 302, b"", [(b"location", query.get("to", "/").encode())])
        elif path == "/bytes":
            await _send(send, 200, b"x" * int(query.get("n", "0")), content="text/plain")
        elif path == "/echo":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            await _send(send, 200, json.dumps({"method": scope["method"], "headers": headers,
                                               "body": body.decode(errors="replace")}).encode())
        elif path == "/log":
            await _send(send, 200, json.dumps(self.log).encode())
        else:
            await _send(send, 404, b'{"error": "no such tool"}')

    async def _tool(self, tool: str, query: dict[str, str], body: bytes) -> dict[str, Any]:
        if tool == "search":
            argument, answer = query.get("q", ""), search(query.get("q", ""))
        elif tool == "calc":
            argument, answer = query.get("expr", ""), calculate(query.get("expr", ""))
        else:
            argument = _code_of(body)
            answer = await run_code(argument)
        self.log.append({"tool": tool, "argument": argument, "time": trio.current_time()})
        return answer

    async def _wait(self, seconds: float, receive: Receive) -> bool:
        """Sleep `seconds`; False when the client hung up meanwhile (counted in `aborted`)."""
        if seconds <= 0:
            return True
        gone = False
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                self.aborted += 1
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
        return not gone


# -- the tools --------------------------------------------------------------------------------


def search(query: str) -> dict[str, Any]:
    words = {w.strip(".,?!").lower() for w in query.split()}
    scored = []
    for key, text in CORPUS.items():
        text_words = {w.strip(".,").lower() for w in text.split()} | {key}
        score = len(words & text_words)
        if score:
            scored.append((-score, key, text))
    return {"results": [{"title": key, "text": text} for _, key, text in sorted(scored)[:3]]}


_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def calculate(expression: str) -> dict[str, Any]:
    try:
        return {"result": _evaluate(ast.parse(expression, mode="eval").body)}
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only arithmetic on numbers is allowed")


def _code_of(body: bytes) -> str:
    try:
        return str(json.loads(body or b"{}").get("code", ""))
    except (ValueError, AttributeError):
        return body.decode(errors="replace")


async def run_code(code: str, time_limit: float = RUN_TIME_LIMIT) -> dict[str, Any]:
    """Run `code` with this Python in an isolated subprocess (-I: no site, no environment)."""
    command = [sys.executable, "-I", "-c", code]
    with trio.move_on_after(time_limit) as scope:
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                      check=False, stdin=subprocess.DEVNULL)
        return {"stdout": done.stdout.decode(errors="replace")[-4000:],
                "stderr": done.stderr.decode(errors="replace")[-4000:],
                "exit_code": done.returncode, "timed_out": False}
    assert scope.cancelled_caught
    return {"stdout": "", "stderr": "", "exit_code": None, "timed_out": True}


# -- ASGI plumbing ----------------------------------------------------------------------------


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return b""
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes,
                headers: list[tuple[bytes, bytes]] | None = None,
                content: str = "application/json") -> None:
    head = [(b"content-type", content.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@asynccontextmanager
async def open_tool_service(latency: float = 0.0, port: int = 0) -> AsyncIterator[ToolService]:
    """The tool service on 127.0.0.1 (`port` 0: a free one) for the duration of the block."""
    service = ToolService(latency=latency)
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 5
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, service, config)
        service.url = str(binds[0]).replace("0.0.0.0", "127.0.0.1")  # noqa: S104
        yield service
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()

    async def serve_forever() -> None:
        async with open_tool_service(args.latency_ms / 1000, args.port) as service:
            print(f"tool service on {service.url}", flush=True)
            await trio.sleep_forever()

    trio.run(serve_forever)


if __name__ == "__main__":
    main()
