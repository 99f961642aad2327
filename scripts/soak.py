#!/usr/bin/env python3
"""Soak and fault run against a live `pie-trio serve`: mixed load, injected faults, leak proof.

For `--duration` seconds (default 600; `--short` is 60) the script keeps every kind of client
busy at once and injects faults among them:

- OpenAI streaming completions (httpx, SSE) and WebSocket and TCP sessions running the built-in
  `text-completion` inferlet;
- the adversarial guest (inferlets/examples/adversarial) in its trap, spin and memory-growth
  modes, each of which must end with its documented termination reason (`trap`,
  `limit`/`cpu_time`, `trap` or `limit`/`memory`);
- uploads: fresh programs (a valid module with a random custom section), invalid modules and
  uploads whose bytes do not match their hash;
- clients that vanish mid-stream (OpenAI, WebSocket and TCP);
- malformed frame floods over TCP and WebSocket (100,000 frames over a 600 s run, scaled to the
  duration), each frame answered by exactly one error or response, some rounds ended by a text
  message (close 1003) or an oversized frame (1009);
- allocation pressure: bursts of concurrent long generations over a small KV pool, with the
  server's `--kv-policy preempt` when it has one (the preemption counter is reported).

Every request is recorded as served, a fault answered as documented, an error by kind (HTTP
status, error code, termination reason, close code), a violation (a `500`, an `internal` error,
a wrong termination reason) or lost: `--request-timeout` seconds without an answer or any
progress (an event, a streamed line), or a connection that ended without the close reason the
protocol promises. p99 latency of normal requests is reported per 10 s window.

When the load stops the script waits for the server to settle and proves nothing leaked:
/metrics shows no instance running, no KV page in use and no session, and the server process's
threads, open file descriptors and resident memory are within bounds of a baseline taken after
warm-up. Then it sends SIGTERM while a few clients are mid-stream, checks that each hears why
it ended, and that the process exits 0. The server is started here (`--tiny` for the random-weight
test model) unless `--url` names a running one; then the process-side checks and the SIGTERM are
skipped. Prints a report and a JSON record; exits 1 on any lost request, violation or leak.

    python scripts/soak.py --short --tiny
    python scripts/soak.py --duration 3600 --json soak.json
    python scripts/soak.py --url http://127.0.0.1:8080 --tcp-url tcp://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import httpx
import msgpack
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pie_trio.client import (  # noqa: E402
    Client,
    ConnectionClosed,
    Event,
    RemoteInstance,
    ServerError,
    connect,
)
from pie_trio.config import settings  # noqa: E402

ADVERSARIAL = ROOT / "inferlets" / "target" / "wasm" / "adversarial.wasm"
TEXT_COMPLETION = ROOT / "pie_trio" / "builtin" / "text-completion.wasm"
FULL_DURATION = 600.0
FULL_FRAMES = 100_000  # malformed frames in a full-length run; scaled to the duration
WINDOW = 10.0  # seconds per p99 window
MIB = 2**20
NO_CLOSE_CODE = (None, 1005, 1006)  # a WebSocket that dropped without a close frame
OWN_FRAME_LIMIT = 1 * MIB  # max_frame_size of the server this script starts
PROMPT_WORDS = "river stone market garden winter letter music bridge forest harbor".split()
# Adversarial modes and the (reason, limit) pairs docs/abi.md promises for them.
ADVERSARIES: dict[str, set[tuple[str, str | None]]] = {
    "trap-mid-generate 2": {("trap", None)},
    "spin": {("limit", "cpu_time")},
    "memory-bomb 4": {("trap", None), ("limit", "memory")},
}


STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"soak {time.monotonic() - STARTED:6.1f} s: {message}", file=sys.stderr, flush=True)


# -- outcomes -------------------------------------------------------------------------------------

SERVED, FAULT_OK, ERROR, LOST, VIOLATION = "served", "fault_ok", "error", "lost", "violation"
TIMED_KINDS = ("openai", "ws", "tcp", "pressure")  # normal requests: their latency is reported


@dataclass
class Outcome:
    kind: str  # what was attempted: openai, ws, tcp, adversarial:spin, flood:tcp, ...
    result: str  # SERVED, FAULT_OK, ERROR, LOST or VIOLATION
    detail: str  # the error kind: HTTP status, error code, termination reason, close code
    started: float  # seconds since the load began (negative: during the warm-up)
    latency: float


@dataclass
class Tally:
    """Every attempt's outcome, and the malformed frames sent and answered."""

    origin: float = field(default_factory=time.monotonic)  # moved to the start of the load
    outcomes: list[Outcome] = field(default_factory=list)
    frames_sent: int = 0
    frames_answered: int = 0

    def add(self, kind: str, result: str, detail: str, started: float) -> None:
        now = time.monotonic()
        self.outcomes.append(Outcome(kind, result, detail, started, now - started))
        if result in (LOST, VIOLATION):
            progress(f"{result}: {kind}: {detail}")


Verdict = tuple[str, str]  # (result, detail)

# The deadline of the request this task is making: each sign of progress (an event, a streamed
# line, an answered frame) moves it on, so a long generation is not a hang but silence is.
DEADLINE: contextvars.ContextVar[tuple[trio.CancelScope, float]] = contextvars.ContextVar(
    "DEADLINE")


def progressed() -> None:
    """The current request made progress: give it `timeout` seconds more from now."""
    scope, timeout = DEADLINE.get()
    scope.deadline = trio.current_time() + timeout


async def attempt(tally: Tally, kind: str, timeout: float,
                  action: Callable[..., Awaitable[Verdict]], *args: Any) -> None:
    """Run one request and record how it ended; exceptions become error kinds or losses."""
    started = time.monotonic()
    try:
        with trio.move_on_after(timeout) as scope:
            token = DEADLINE.set((scope, timeout))
            try:
                result, detail = await action(*args)
            finally:
                DEADLINE.reset(token)
        if scope.cancelled_caught:
            result, detail = LOST, f"no answer or progress for {timeout:.0f} s"
    except ServerError as exc:
        result, detail = (VIOLATION if exc.code == "internal" else ERROR), exc.code
    except ConnectionClosed as exc:
        result, detail = closed_verdict(exc.code, exc.reason)
    except trio_websocket.ConnectionClosed as exc:
        code = exc.reason.code if exc.reason else None
        result, detail = closed_verdict(code, (exc.reason.reason or "") if exc.reason else "")
    except (ConnectionError, OSError, trio.BrokenResourceError, trio_websocket.HandshakeError,
            httpx.HTTPError) as exc:
        result, detail = LOST, f"{type(exc).__name__}: {exc}"[:160]
    except ValueError as exc:  # msgpack or JSON the client could not decode
        result, detail = VIOLATION, f"undecodable answer: {exc}"[:160]
    tally.add(kind, result, detail, started)


def closed_verdict(code: int | None, reason: str) -> Verdict:
    if code in NO_CLOSE_CODE:
        return LOST, f"connection ended without a close code ({reason or 'no reason'})"[:160]
    return ERROR, f"close {code}"


# -- the run's shared state -----------------------------------------------------------------------


@dataclass
class Soak:
    http_url: str
    ws_url: str
    tcp_url: str | None
    http: httpx.AsyncClient
    tally: Tally
    rng: random.Random
    request_timeout: float
    frame_limit: int
    frames_target: int = 0
    adversarial: bytes | None = None
    stop_at: float = 0.0
    load_started: float = 0.0
    flood_workers: int = 1

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def transports(self) -> list[str]:
        return ["ws", "tcp"] if self.tcp_url else ["ws"]

    def url(self, transport: str) -> str:
        return self.tcp_url if transport == "tcp" and self.tcp_url else self.ws_url

    def prompt(self, words: int = 12) -> str:
        return " ".join(self.rng.choice(PROMPT_WORDS) for _ in range(words))

    async def run(self, kind: str, action: Callable[..., Awaitable[Verdict]],
                  *args: Any) -> None:
        """`await action(*args)` as one recorded request of `kind`."""
        await attempt(self.tally, kind, self.request_timeout, action, *args)


# -- OpenAI streams ------------------------------------------------------------------------------


async def openai_stream(soak: Soak, max_tokens: int, vanish: bool = False) -> Verdict:
    """One streaming completion: served when it ends in [DONE] without an error chunk."""
    body = {"prompt": soak.prompt(), "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0}
    async with soak.http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            status = response.status_code
            return (VIOLATION if status >= 500 and status != 503 else ERROR), f"HTTP {status}"
        error = None
        async for line in response.aiter_lines():
            progressed()
            if vanish and line.startswith("data: "):
                return FAULT_OK, "left mid-stream"
            if line == "data: [DONE]":
                return (ERROR, f"stream error: {error}") if error else (SERVED, "")
            if line.startswith("data: ") and '"error"' in line:
                chunk = json.loads(line[6:])["error"]
                error = chunk.get("code") or busy(chunk.get("message"))
    return LOST, "the stream ended without data: [DONE]"


# -- WebSocket and TCP sessions ------------------------------------------------------------------


async def session_completion(soak: Soak, transport: str, args: list[str]) -> Verdict:
    """Launch text-completion on a fresh connection and follow it to its end."""
    async with connect(soak.url(transport)) as client:
        return await follow(await client.launch("text-completion", args))


async def follow(instance: RemoteInstance) -> Verdict:
    """Follow an instance to its end: served when it finished."""
    end = await final_event(instance)
    if end is None:
        return LOST, "events ended without `terminated`"
    return terminated_verdict(end.reason, end.detail)


async def final_event(instance: RemoteInstance) -> Event | None:
    """The instance's `terminated` event, its detail extended with the tail of its stderr
    (which says why a guest exited with an error, e.g. out of KV pages)."""
    stderr = ""
    async for event in instance.events():
        progressed()
        if event.kind == "stderr":
            stderr = (stderr + (event.text or ""))[-400:]
        if event.kind == "terminated":
            event.detail = f"{event.detail or ''} {stderr}".strip()
            return event
    return None


def terminated_verdict(reason: str | None, detail: str | None) -> Verdict:
    if reason == "finished":
        return SERVED, ""
    return ERROR, f"terminated {reason}: {busy(detail)}"


def busy(detail: str | None) -> str:
    """Shorten a termination detail to its kind (KV exhaustion shows as `out of KV pages`)."""
    text = (detail or "").strip()
    return "out of KV pages" if "KV pages" in text else text[:60]


def completion_args(soak: Soak, max_tokens: int, ignore_eos: bool = False) -> list[str]:
    args = ["--prompt", soak.prompt(), "--max-tokens", str(max_tokens)]
    return args + ["--ignore-eos"] if ignore_eos else args


async def adversary(soak: Soak, transport: str, mode: str) -> Verdict:
    """Run one adversarial mode; it must end with the reason docs/abi.md gives it."""
    assert soak.adversarial is not None
    async with connect(soak.url(transport)) as client:
        program = await client.upload(soak.adversarial)
        end = await final_event(await client.launch(program, mode.split()))
    if end is None:
        return LOST, "events ended without `terminated`"
    return adversary_verdict(mode, end.reason, end.raw.get("limit"), end.detail)


def adversary_verdict(mode: str, reason: str | None, limit: str | None,
                      detail: str | None) -> Verdict:
    if (reason, limit) in ADVERSARIES[mode]:
        return FAULT_OK, f"{reason}" + (f"/{limit}" if limit else "")
    if reason == "error" and busy(detail) == "out of KV pages":  # pressure, not a wrong answer
        return ERROR, "terminated error: out of KV pages"
    return VIOLATION, f"ended {reason}/{limit}: {(detail or '')[:80]}"


# -- uploads -------------------------------------------------------------------------------------


def with_custom_section(module: bytes, payload: bytes) -> bytes:
    """`module` with a custom section appended: still valid, but a new program (hash)."""
    name = b"soak"
    body = leb128(len(name)) + name + payload
    return module + b"\x00" + leb128(len(body)) + body


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def upload_fresh(soak: Soak, base: bytes) -> Verdict:
    module = with_custom_section(base, soak.rng.randbytes(32))
    async with connect(soak.ws_url) as client:
        stored = await client.upload(module)
    expected = blake3.blake3(module).hexdigest()
    return (SERVED, "") if stored == expected else (VIOLATION, "stored under another hash")


async def upload_invalid(soak: Soak) -> Verdict:
    junk = b"\x00asm\x01\x00\x00\x00" + soak.rng.randbytes(256)
    return await expect_refusal(soak, junk, junk, "invalid_program")


async def upload_mismatched(soak: Soak, base: bytes) -> Verdict:
    announced = with_custom_section(base, soak.rng.randbytes(32))
    sent = with_custom_section(base, soak.rng.randbytes(32))  # same size, other bytes
    return await expect_refusal(soak, announced, sent, "hash_mismatch")


async def expect_refusal(soak: Soak, announced: bytes, sent: bytes, code: str) -> Verdict:
    program = blake3.blake3(announced).hexdigest()
    async with connect(soak.ws_url) as client:
        await client.request("upload_begin", hash=program, size=len(announced))
        await client.request("upload_chunk", hash=program, data=sent)
        try:
            await client.request("upload_end", hash=program)
        except ServerError as exc:
            if exc.code == code:
                return FAULT_OK, code
            raise
    return VIOLATION, f"accepted an upload that should fail with {code}"


# -- clients that vanish -------------------------------------------------------------------------


async def vanish_session(soak: Soak, transport: str) -> Verdict:
    """Launch a long generation and leave after its first event."""
    async with connect(soak.url(transport)) as client:
        instance = await client.launch("text-completion", completion_args(soak, 400, True))
        event = await instance.next_event()
        if event.kind == "terminated":
            return terminated_verdict(event.reason, event.detail)
    return FAULT_OK, "left mid-stream"


# -- malformed frames ----------------------------------------------------------------------------

JUNK_TYPES: list[Any] = ["query", "signal_instance", "terminate_instance", "authenticate",
                         "nonsense", "", 7, [1], None, {"a": 1}]
JUNK_FIELDS = ["what", "program", "instance", "message", "token", "args", "size", "data"]


def junk_value(rng: random.Random) -> Any:
    return rng.choice([None, True, -1, 2**64 - 1, 1.5, "x" * rng.randrange(20),
                       rng.randbytes(8), [1, [2]], {"k": "v"}, "instances", "models"])


def junk_request(rng: random.Random, frame_id: int) -> dict[str, Any]:
    request: dict[str, Any] = {"type": rng.choice(JUNK_TYPES),
                               "id": rng.choice([frame_id, -1, "1", 2**64 - 1, 1.5, None])}
    for name in rng.sample(JUNK_FIELDS, rng.randrange(4)):
        request[name] = junk_value(rng)
    return request


def malformed_frame(rng: random.Random, frame_id: int) -> bytes:
    """One frame the server must refuse by name: garbage, truncated or ill-typed msgpack, ext
    types, deep nesting, requests of unknown type or with fields of the wrong type."""
    packed = msgpack.packb(junk_request(rng, frame_id))
    shapes: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randrange(65)),
        lambda: packed,
        lambda: packed[:rng.randrange(1, len(packed))],
        lambda: msgpack.packb(junk_value(rng)),
        lambda: b"\x91" * rng.randint(1, 1200) + b"\xc0",
        lambda: b"\x81\xa1k" * rng.randint(1, 300) + b"\xc0",
        lambda: msgpack.packb({"id": frame_id,
                               "type": msgpack.ExtType(rng.randrange(128), rng.randbytes(4))}),
    ]
    return rng.choice(shapes)()


NORMAL_ID = 424242
NORMAL = msgpack.packb({"id": NORMAL_ID, "type": "query", "what": "models"})


def reply_verdict(reply: Any) -> str | None:
    """None when `reply` is a proper answer to a malformed frame; else what is wrong."""
    if not isinstance(reply, dict) or reply.get("type") not in ("response", "error"):
        return f"not a response or error: {str(reply)[:80]}"
    if reply.get("error") == "internal":
        return f"internal error: {str(reply.get('message'))[:80]}"
    return None


class FrameReader:
    """Length-prefixed msgpack frames from a TCP stream."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = b""

    async def next(self) -> Any:
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack_from(">I", self.buffer)
                if len(self.buffer) >= 4 + size:
                    data, self.buffer = self.buffer[4:4 + size], self.buffer[4 + size:]
                    return msgpack.unpackb(data, strict_map_key=False)
            data = await self.stream.receive_some()
            if not data:
                raise ConnectionClosed(reason="the server closed the connection")
            self.buffer += data


def has(message: Any, key: str, value: Any) -> bool:
    return isinstance(message, dict) and message.get(key) == value


def tcp_frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


async def flood_tcp(soak: Soak, frames: list[bytes], ending: str) -> Verdict:
    assert soak.tcp_url is not None
    host, port = soak.tcp_url.removeprefix("tcp://").rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        reader = FrameReader(stream)
        if (wrong := await exchange(soak, frames, lambda f: stream.send_all(tcp_frame(f)),
                                    reader.next)) is not None:
            return VIOLATION, wrong
        if ending == "oversize":
            await stream.send_all(struct.pack(">I", 2**32 - 1))
            refusal, close = await reader.next(), await reader.next()
            if has(refusal, "error", "too_large") and has(close, "code", 1009):
                return FAULT_OK, "too_large, close 1009"
            return VIOLATION, f"oversized frame answered {refusal} then {close}"
        await stream.send_all(tcp_frame(NORMAL))
        return normal_verdict(await reader.next())


async def flood_ws(soak: Soak, frames: list[bytes], ending: str) -> Verdict:
    async with trio_websocket.open_websocket_url(soak.ws_url) as ws:
        async def receive() -> Any:
            return msgpack.unpackb(await ws.get_message(), strict_map_key=False)

        if (wrong := await exchange(soak, frames, ws.send_message, receive)) is not None:
            return VIOLATION, wrong
        if ending in ("oversize", "text"):
            return await ws_refusal(ws, soak.frame_limit, ending)
        await ws.send_message(NORMAL)
        return normal_verdict(await receive())


async def ws_refusal(ws: trio_websocket.WebSocketConnection, limit: int, ending: str) -> Verdict:
    """A text message must close with 1003, an oversized one with 1009."""
    expected = 1003 if ending == "text" else 1009
    try:
        await ws.send_message("text" if ending == "text" else b"\0" * (limit + 1))
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed as exc:
        code = exc.reason.code if exc.reason else None
    if code == expected:
        return FAULT_OK, f"close {code}"
    return closed_verdict(code, "") if code in NO_CLOSE_CODE else (VIOLATION, f"close {code}")


async def exchange(soak: Soak, frames: list[bytes], send: Callable[[bytes], Awaitable[None]],
                   receive: Callable[[], Awaitable[Any]]) -> str | None:
    """Send frames in small pipelined batches; each must get one proper answer."""
    for start in range(0, len(frames), 25):
        batch = frames[start:start + 25]
        for data in batch:
            await send(data)
        soak.tally.frames_sent += len(batch)
        for _ in batch:
            if (wrong := reply_verdict(await receive())) is not None:
                return wrong
            soak.tally.frames_answered += 1
            progressed()
    return None


def normal_verdict(reply: Any) -> Verdict:
    if has(reply, "id", NORMAL_ID) and has(reply, "ok", True):
        return FAULT_OK, "answered, then served a normal request"
    return VIOLATION, f"normal request after the flood answered {str(reply)[:80]}"


async def flood_round(soak: Soak, transport: str, size: int) -> Verdict:
    """One connection's worth of malformed frames, then a normal request or a refusal."""
    frames = [malformed_frame(soak.rng, i) for i in range(size)]
    # One round in 20 ends with a refusal that closes the connection.
    ending = soak.rng.choice(["oversize", "text"] if transport == "ws" else ["oversize"])
    ending = ending if soak.rng.random() < 0.05 else "normal"
    if transport == "tcp":
        return await flood_tcp(soak, frames, ending)
    return await flood_ws(soak, frames, ending)


# -- allocation pressure -------------------------------------------------------------------------


async def pressure_burst(soak: Soak, size: int, max_tokens: int) -> None:
    """`size` long generations at once on one connection: more KV than the pool holds."""
    started = time.monotonic()
    try:
        async with connect(soak.ws_url) as client, trio.open_nursery() as nursery:
            for _ in range(size):
                nursery.start_soon(soak.run, "pressure", follow_launch, soak, client,
                                   max_tokens)
    except ConnectionError as exc:  # could not connect: nobody answered
        soak.tally.add("pressure", LOST, str(exc)[:160], started)


async def follow_launch(soak: Soak, client: Client, max_tokens: int) -> Verdict:
    return await follow(await client.launch("text-completion",
                                            completion_args(soak, max_tokens, True)))


# -- workers --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How much of each kind of load runs at once, and how long each request may be."""

    streams: int = 2  # OpenAI streaming workers
    sessions: int = 1  # WebSocket and TCP completion workers, each
    max_tokens: int = 24
    pressure_size: int = 8
    pressure_tokens: int = 160
    pause: float = 0.05  # between one worker's requests


async def openai_worker(soak: Soak, plan: Plan) -> None:
    while soak.running():
        await soak.run("openai", openai_stream, soak, plan.max_tokens)
        await trio.sleep(plan.pause)


async def session_worker(soak: Soak, plan: Plan, transport: str) -> None:
    while soak.running():
        args = completion_args(soak, plan.max_tokens)
        await soak.run(transport, session_completion, soak, transport, args)
        await trio.sleep(plan.pause)


async def adversarial_worker(soak: Soak) -> None:
    turn = 0
    while soak.running():
        mode = list(ADVERSARIES)[turn % len(ADVERSARIES)]
        transport = soak.transports()[turn % len(soak.transports())]
        await soak.run(f"adversarial:{mode.split()[0]}", adversary, soak, transport, mode)
        turn += 1
        await trio.sleep(1.0)  # a spin burns a core until its CPU limit


async def upload_worker(soak: Soak, base: bytes) -> None:
    turn = 0
    while soak.running():
        if turn % 3 == 0:
            await soak.run("upload", upload_fresh, soak, base)
        elif turn % 3 == 1:
            await soak.run("upload:invalid", upload_invalid, soak)
        else:
            await soak.run("upload:mismatch", upload_mismatched, soak, base)
        turn += 1
        await trio.sleep(2.0)  # each fresh program is compiled: keep the store's churn modest


async def vanish_worker(soak: Soak, plan: Plan) -> None:
    turn = 0
    while soak.running():
        choices = ["openai", *soak.transports()]
        transport = choices[turn % len(choices)]
        if transport == "openai":
            await soak.run("vanish:openai", openai_stream, soak, 400, True)
        else:
            await soak.run(f"vanish:{transport}", vanish_session, soak, transport)
        turn += 1
        await trio.sleep(0.5)


async def flood_worker(soak: Soak, transport: str, frames: int) -> None:
    """Malformed frames at a pace that reaches this worker's share of `frames` early; on a
    machine too slow for that, it goes on past the end of the load until it has sent it."""
    quota = -(-frames // soak.flood_workers)
    rate = max(1.0, 1.25 * quota / max(1.0, soak.stop_at - soak.load_started))
    sent = 0
    while soak.running() or sent < quota:
        due = min(rate * (time.monotonic() - soak.load_started), quota) - sent
        if soak.running() and due < 50:
            await trio.sleep((50 - due) / rate)
            continue
        size = max(1, min(200, int(due) if soak.running() else quota - sent))
        await soak.run(f"flood:{transport}", flood_round, soak, transport, size)
        sent += size


async def pressure_worker(soak: Soak, plan: Plan) -> None:
    while soak.running():
        await pressure_burst(soak, plan.pressure_size, plan.pressure_tokens)
        await trio.sleep(2.0)


async def sample_windows(soak: Soak, pid: int | None, samples: list[dict[str, Any]]) -> None:
    """Every 10 s of the load: /health's latency and the server process's figures."""
    while soak.running():
        started = time.monotonic()
        try:
            status: int | str = (await soak.http.get("/health")).status_code
        except httpx.HTTPError as exc:  # the workers record losses; this is only a sample
            status = type(exc).__name__
        sample = {"start_s": int(round(started - soak.load_started)),
                  "health_ms": round(1000 * (time.monotonic() - started), 1),
                  "health": status}
        samples.append(sample | (process_stats(pid) if pid is not None else {}))
        await trio.sleep(max(0.0, WINDOW - (time.monotonic() - started)))


async def run_load(soak: Soak, plan: Plan, duration: float, frames: int, upload_base: bytes,
                   pid: int | None, samples: list[dict[str, Any]]) -> None:
    """Every worker at once for `duration` seconds, `frames` malformed frames among them."""
    soak.load_started = soak.tally.origin = time.monotonic()
    soak.stop_at = soak.load_started + duration
    soak.flood_workers = len(soak.transports())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_windows, soak, pid, samples)
        for _ in range(plan.streams):
            nursery.start_soon(openai_worker, soak, plan)
        for transport in soak.transports():
            for _ in range(plan.sessions):
                nursery.start_soon(session_worker, soak, plan, transport)
            nursery.start_soon(flood_worker, soak, transport, frames)
        if soak.adversarial is not None:
            nursery.start_soon(adversarial_worker, soak)
        nursery.start_soon(upload_worker, soak, upload_base)
        nursery.start_soon(vanish_worker, soak, plan)
        nursery.start_soon(pressure_worker, soak, plan)


async def warm_up(soak: Soak, plan: Plan, upload_base: bytes) -> None:
    """One of everything, so that caches and pools exist before the baseline is taken."""
    await soak.run("openai", openai_stream, soak, plan.max_tokens)
    for transport in soak.transports():
        args = completion_args(soak, plan.max_tokens)
        await soak.run(transport, session_completion, soak, transport, args)
        await soak.run(f"flood:{transport}", flood_round, soak, transport, 50)
        await soak.run(f"vanish:{transport}", vanish_session, soak, transport)
    if soak.adversarial is not None:
        for mode in ADVERSARIES:
            await soak.run(f"adversarial:{mode.split()[0]}", adversary, soak, "ws", mode)
    await soak.run("upload", upload_fresh, soak, upload_base)
    await pressure_burst(soak, 2, plan.max_tokens)


# -- the server: metrics and the process ---------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {metric name: value summed over its labels}."""
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        values[name_labels.split("{", 1)[0]] += float(value)
    return dict(values)


async def read_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    response = await http.get("/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


def process_stats(pid: int) -> dict[str, int]:
    """Threads, open file descriptors and resident memory of the server process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status if ":" in line}
    return {"threads": int(fields["Threads"][0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mib": int(fields["VmRSS"][0]) // 1024}


# What must be back to zero once no client is left. KV pages the automatic prefix cache keeps
# are a bounded cache, not a leak: they are subtracted from the pages in use.
QUIET = ("instances_running", "sessions", "kv_pages_in_use", "kv_pages_swapped",
         "embed_slots_in_use")
END_STATE = (*QUIET, "kv_pages_total", "prefix_cache_pages")


def held(metrics: dict[str, float]) -> dict[str, float]:
    """The QUIET figures that are not zero."""
    values = {key: metrics.get(f"pie_trio_{key}", 0.0) for key in QUIET}
    values["kv_pages_in_use"] -= metrics.get("pie_trio_prefix_cache_pages", 0.0)
    return {key: value for key, value in values.items() if value}


async def settle(http: httpx.AsyncClient, pid: int | None, timeout: float) -> dict[str, Any]:
    """Wait until the server holds nothing for clients (and its idle worker threads, which
    live 10 s, are gone); returns the last metrics and process figures."""
    deadline = time.monotonic() + timeout
    threads: list[int] = []
    while True:
        metrics = await read_metrics(http)
        busy_now = held(metrics)
        stats = process_stats(pid) if pid is not None else {}
        threads = (threads + [stats.get("threads", 0)])[-12:]
        # Quiet, and the thread count steady for 12 s: trio's idle threads have exited.
        steady = len(threads) == 12 and len(set(threads)) == 1
        if (not busy_now and (pid is None or steady)) or time.monotonic() > deadline:
            return {"metrics": metrics, "still_busy": busy_now, "process": stats}
        await trio.sleep(1.0)


@dataclass
class Bounds:
    rss_mib: int
    threads: int
    fds: int
    tasks: int


def leaks(end: dict[str, Any], baseline: dict[str, Any] | None, bounds: Bounds) -> list[str]:
    found = [f"{name} is {value:g} after the load (expected 0)"
             for name, value in end["still_busy"].items()]
    if baseline is None or not end["process"]:
        return found
    before, after = baseline["process"], end["process"]
    for key, bound in (("rss_mib", bounds.rss_mib), ("threads", bounds.threads),
                       ("fds", bounds.fds)):
        if after[key] - before[key] > bound:
            found.append(f"{key} grew from {before[key]} to {after[key]} (bound +{bound})")
    tasks = [state["metrics"].get("pie_trio_trio_tasks") for state in (baseline, end)]
    if None not in tasks and tasks[1] - tasks[0] > bounds.tasks:
        found.append(f"trio tasks grew from {tasks[0]:g} to {tasks[1]:g} (bound +{bounds.tasks})")
    return found


@dataclass
class Server:
    process: trio.Process
    http: str
    ws: str
    tcp: str | None
    log: Path


def serve_command(args: argparse.Namespace, kv_policy: str | None) -> list[str]:
    model = "tiny" if args.tiny else args.model
    command = [sys.executable, "-m", "pie_trio", "serve", "--model", model,
               "--http-port", "0", "--tcp-port", "0", "--log-level", "warning",
               # Faults end quickly, and the store of uploaded programs stays small.
               "--instance-memory", "64MiB", "--instance-cpu-time", "0.5",
               "--program-store-programs", "16", "--max-frame-size", str(OWN_FRAME_LIMIT),
               "--max-connections-per-peer", "512"]
    # A small KV pool, so that the pressure bursts run out of it.
    command += ["--page-size", "4"] if model == "tiny" else ["--kv-memory", args.kv_memory]
    return command + (["--kv-policy", kv_policy] if kv_policy else [])


def preempt_policy() -> str | None:
    """`preempt` when this server version has `--kv-policy preempt`, else None. Read from the
    settings `pie-trio serve --help` is generated from, without starting another Python."""
    for setting in settings():
        if setting.name == "kv_policy":
            try:
                setting.metadata["parse"]("preempt")
            except ValueError:  # ConfigError: a policy this server does not know
                return None
            return "preempt"
    return None


async def start_server(command: list[str], timeout: float) -> Server:
    log = Path(tempfile.mkstemp(prefix="pie-trio-soak-", suffix=".log")[1])
    progress(f"starting: {' '.join(command[1:])} (log: {log})")
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with trio.fail_after(timeout):
            urls = await served_urls(process, log)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return Server(process, urls["http"], urls["ws"], urls["tcp"], log)


async def served_urls(process: trio.Process, log: Path) -> dict[str, str]:
    """The URLs the server prints once it listens ("pie-trio serving URL (...)"), by scheme."""
    assert process.stdout is not None
    urls: dict[str, str] = {}
    buffer = b""
    while len(urls) < 3:
        chunk = await process.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"the server exited before it listened; see {log}")
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"pie-trio serving "):
                url = line.decode().split()[2]
                urls[url.split("://")[0]] = url
    return urls


# -- SIGTERM with clients mid-stream --------------------------------------------------------------


async def drain_witness(soak: Soak, transport: str, started: trio.Event) -> Verdict:
    """A long generation that is running when SIGTERM comes: it must hear `terminated`, and
    then the connection's close reason, 1001."""
    async with connect(soak.url(transport)) as client:
        instance = await client.launch("text-completion", completion_args(soak, 300, True))
        await instance.next_event()
        started.set()
        async for event in instance.events():
            if event.kind == "terminated" and event.reason not in ("evicted", "finished"):
                return VIOLATION, f"ended {event.reason} while draining"
        closed = await client.wait_closed()
        if closed.code in NO_CLOSE_CODE:
            return closed_verdict(closed.code, closed.reason)
        if closed.code != 1001:
            return VIOLATION, f"close {closed.code}"
        return SERVED, "close 1001"


async def drain_stream(soak: Soak, started: trio.Event) -> Verdict:
    """An OpenAI stream running at SIGTERM: it must end with [DONE] (an error chunk before it
    when it was cut short)."""
    body = {"prompt": soak.prompt(), "max_tokens": 300, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=soak.http_url, timeout=None) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:  # refused before it streamed: still an answer
            started.set()
            await response.aread()
            return ERROR, f"HTTP {response.status_code}"
        async for line in response.aiter_lines():
            started.set()
            if line == "data: [DONE]":
                return SERVED, "[DONE]"
    return LOST, "the stream ended without data: [DONE]"


async def sigterm_drain(soak: Soak, server: Server, exit_timeout: float) -> dict[str, Any]:
    """SIGTERM while a WebSocket, a TCP session and an OpenAI stream are mid-generation."""
    events = {kind: trio.Event() for kind in ["openai", *soak.transports()]}
    async with trio.open_nursery() as nursery:
        for kind, started in events.items():
            if kind == "openai":
                nursery.start_soon(soak.run, "drain:openai", drain_stream, soak, started)
            else:
                nursery.start_soon(soak.run, f"drain:{kind}", drain_witness, soak, kind, started)
        with trio.move_on_after(30):
            for started in events.values():
                await started.wait()
        progress("sending SIGTERM")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(exit_timeout):
            await server.process.wait()
    return {"returncode": server.process.returncode,
            "exit_seconds": round(time.monotonic() - signalled, 2),
            "clean": server.process.returncode == 0}


# -- the report -----------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def windows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """p99 latency of served normal requests per 10 s of the load."""
    by_window: dict[int, list[float]] = defaultdict(list)
    for outcome in outcomes:
        if outcome.result == SERVED and outcome.kind in TIMED_KINDS and outcome.started >= 0:
            by_window[int(outcome.started // WINDOW)].append(outcome.latency)
    return [{"start_s": int(index * WINDOW), "served": len(values),
             "p99_ms": round(1000 * p99(values), 1)} for index, values in sorted(by_window.items())]


def kind_stats(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per kind of request: how many ended each way, and the median and worst latency."""
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    stats = {}
    for kind, group in sorted(by_kind.items()):
        latencies = sorted(o.latency for o in group)
        stats[kind] = {**Counter(o.result for o in group),
                       "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                       "max_ms": round(1000 * latencies[-1], 1)}
    return stats


def summarize(tally: Tally) -> dict[str, Any]:
    for outcome in tally.outcomes:
        outcome.started -= tally.origin
    results = Counter(outcome.result for outcome in tally.outcomes)
    errors: Counter[str] = Counter()
    for outcome in tally.outcomes:
        if outcome.result in (ERROR, VIOLATION, LOST):
            errors[f"{outcome.kind}: {outcome.detail}"] += 1
    bad = [o for o in tally.outcomes if o.result in (LOST, VIOLATION)]
    return {"requests": len(tally.outcomes), "served": results[SERVED],
            "faults_answered": results[FAULT_OK], "errors": results[ERROR],
            "lost": results[LOST], "violations": results[VIOLATION],
            "errors_by_kind": dict(errors.most_common()),
            "by_kind": kind_stats(tally.outcomes),
            "lost_or_violating": [f"{o.kind} at {o.started:.1f} s: {o.result}: {o.detail}"
                                  for o in bad[:20]],
            "p99_windows": windows(tally.outcomes)}


def print_report(record: dict[str, Any], out: Any) -> None:
    summary = record["summary"]
    lines = [
        f"pie-trio soak: {record['duration_s']:.0f} s of load on {record['server']}",
        f"  requests {summary['requests']}: served {summary['served']}, faults answered as "
        f"documented {summary['faults_answered']}, errors {summary['errors']}, "
        f"violations {summary['violations']}, lost {summary['lost']}",
        f"  malformed frames: {record['frames']['sent']} sent, {record['frames']['answered']} "
        f"answered (target {record['frames']['target']})",
        f"  kv policy: {record['kv_policy'] or 'default'}; preemptions "
        f"{record['preemptions']}",
        "  by kind of request:",
        *[f"    {kind:30s} " + " ".join(f"{k}={v}" for k, v in stats.items())
          for kind, stats in summary["by_kind"].items()],
        "  errors by kind:",
        *[f"    {count:6d}  {kind}" for kind, count in summary["errors_by_kind"].items()],
        "  every 10 s: /health latency and the server process",
        *[f"    {w['start_s']:5d} s  /health {w['health']} in {w['health_ms']:7.1f} ms  "
          + " ".join(f"{k}={w[k]}" for k in ("threads", "fds", "rss_mib") if k in w)
          for w in record["samples"]],
        "  p99 latency of served requests per 10 s:",
        *[f"    {w['start_s']:5d} s  {w['served']:5d} served  p99 {w['p99_ms']:8.1f} ms"
          for w in summary["p99_windows"]],
        f"  after the load: {record['end_state']}",
        f"  process: baseline {record['baseline']}, after {record['after']}",
        f"  trio tasks: {record['trio_tasks']}",
        f"  shutdown: {record['shutdown']}",
        f"  leaks: {record['leaks'] or 'none'}",
        *[f"  {line}" for line in summary["lost_or_violating"]],
        *([f"  server log: {record['server_log']}"] if "server_log" in record else []),
        f"soak {'PASSED' if record['ok'] else 'FAILED'}",
    ]
    print("\n".join(lines), file=out, flush=True)


# -- the run --------------------------------------------------------------------------------------


def plan_for(args: argparse.Namespace) -> Plan:
    """Short runs (CI, a shared machine) keep concurrency modest; full runs push harder."""
    if args.short:
        return Plan(streams=1, sessions=1, pressure_size=6, pressure_tokens=120, pause=0.2)
    return Plan(streams=4, sessions=2, pressure_size=12)


def frames_for(args: argparse.Namespace, seconds: float) -> int:
    """Malformed frames for `seconds` of load, at --frames per 600 s."""
    return int(args.frames * seconds / FULL_DURATION)


async def soak_against(soak: Soak, args: argparse.Namespace, server: Server | None,
                       kv_policy: str | None) -> dict[str, Any]:
    plan = plan_for(args)
    upload_base = TEXT_COMPLETION.read_bytes()
    pid = server.process.pid if server is not None else None
    progress(f"warming up: one of everything, then {args.warmup:.0f} s of the load")
    await warm_up(soak, plan, upload_base)
    # The baseline follows a stretch of the same load, so that what concurrency allocates
    # once (thread stacks, allocator arenas, compiled code) is in it and not counted as growth.
    await run_load(soak, plan, args.warmup, frames_for(args, args.warmup), upload_base, pid, [])
    baseline = await settle(soak.http, pid, args.settle_timeout)
    progress(f"load for {args.duration:.0f} s (baseline {baseline['process'] or 'n/a'})")
    samples: list[dict[str, Any]] = []
    warm_frames, warm_answered = soak.tally.frames_sent, soak.tally.frames_answered
    await run_load(soak, plan, args.duration, soak.frames_target, upload_base, pid, samples)
    sent = soak.tally.frames_sent - warm_frames
    progress("load stopped; waiting for the server to settle")
    end = await settle(soak.http, pid, args.settle_timeout)
    bounds = Bounds(args.max_rss_growth, args.max_thread_growth, args.max_fd_growth,
                    args.max_task_growth)
    shutdown = (await sigterm_drain(soak, server, args.exit_timeout) if server is not None
                else {"skipped": "--url: the server is not ours to stop"})
    return {
        "duration_s": args.duration, "short": args.short, "kv_policy": kv_policy,
        "server": args.url or " ".join(serve_command(args, kv_policy)[3:]),
        "warmup_s": args.warmup,
        "frames": {"sent": sent, "answered": soak.tally.frames_answered - warm_answered,
                   "target": soak.frames_target, "met": sent >= soak.frames_target,
                   "warm_up": warm_frames},
        "samples": samples,
        "preemptions": end["metrics"].get("pie_trio_kv_preemptions_total"),
        "end_state": {k: end["metrics"].get(f"pie_trio_{k}") for k in END_STATE},
        "baseline": baseline["process"], "after": end["process"],
        "trio_tasks": {"baseline": baseline["metrics"].get("pie_trio_trio_tasks"),
                       "after": end["metrics"].get("pie_trio_trio_tasks")},
        "leaks": leaks(end, baseline, bounds), "shutdown": shutdown,
        "adversarial": "on" if soak.adversarial else f"off: {ADVERSARIAL} is not built",
    }


async def soak_main(args: argparse.Namespace) -> dict[str, Any]:
    kv_policy = None
    server = None
    if args.url is None:
        kv_policy = preempt_policy()
        server = await start_server(serve_command(args, kv_policy), args.start_timeout)
    http_url = server.http if server is not None else args.url
    try:
        async with httpx.AsyncClient(base_url=http_url, timeout=args.request_timeout,
                                     limits=httpx.Limits(max_connections=64)) as http:
            soak = Soak(
                http_url=http_url, ws_url=server.ws if server else ws_url(http_url),
                tcp_url=server.tcp if server else args.tcp_url, http=http, tally=Tally(),
                rng=random.Random(args.seed), request_timeout=args.request_timeout,
                frame_limit=OWN_FRAME_LIMIT if server else args.max_frame_size,
                frames_target=frames_for(args, args.duration),
                adversarial=ADVERSARIAL.read_bytes() if ADVERSARIAL.exists() else None)
            record = await soak_against(soak, args, server, kv_policy)
    finally:
        if server is not None and server.process.returncode is None:
            server.process.kill()
            await server.process.wait()
    record = finish(record, summarize(soak.tally), soak)
    if server is not None:
        if record["ok"]:
            server.log.unlink()
        else:
            record["server_log"] = str(server.log)
    return record


def finish(record: dict[str, Any], summary: dict[str, Any], soak: Soak) -> dict[str, Any]:
    record["summary"] = summary
    shutdown = record["shutdown"]
    record["ok"] = (summary["lost"] == 0 and summary["violations"] == 0 and not record["leaks"]
                    and shutdown.get("clean", True) and record["frames"]["met"])
    return record


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/ws"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 when every client got a response or a close reason and nothing "
               "leaked; 1 otherwise.")
    add = parser.add_argument
    add("--duration", type=float, default=FULL_DURATION,
        help="seconds of load (default: 600)")
    add("--short", action="store_true", help="a one-minute run with modest concurrency (CI)")
    add("--url", help="HTTP base URL of a running server without auth (default: start one); "
                      "the process checks and the SIGTERM are then skipped")
    add("--tcp-url", help="with --url: the server's tcp://HOST:PORT (default: no TCP load)")
    add("--max-frame-size", type=int, default=4 * MIB,
        help="with --url: the server's max_frame_size in bytes (default: 4 MiB)")
    add("--model", default="default", help="model of the server started here (default: default)")
    add("--tiny", action="store_true", help="serve the random-weight test model (fast)")
    add("--kv-memory", default="48MiB",
        help="KV pool of the server started here, small so that bursts exhaust it "
             "(default: 48MiB; --tiny uses 256 pages of 4 tokens)")
    add("--warmup", type=float, default=None,
        help="seconds of the load before the baseline is taken (default: 30; 10 with --short)")
    add("--frames", type=int, default=FULL_FRAMES,
        help="malformed frames per 600 s of load, scaled to --duration (default: 100000)")
    add("--request-timeout", type=float, default=120.0,
        help="seconds a request may go without an answer or any progress before it counts "
             "as lost (default: 120)")
    add("--settle-timeout", type=float, default=90.0,
        help="seconds to wait for the server to hold nothing after the load (default: 90)")
    add("--max-rss-growth", type=int, default=192,
        help="MiB the server's resident memory may grow over the baseline (default: 192)")
    add("--max-thread-growth", type=int, default=4,
        help="threads the server may gain over the baseline (default: 4)")
    add("--max-task-growth", type=int, default=16,
        help="trio tasks the server may gain over the baseline (default: 16)")
    add("--max-fd-growth", type=int, default=16,
        help="open file descriptors the server may gain over the baseline (default: 16)")
    add("--start-timeout", type=float, default=300.0,
        help="seconds the server may take to start (default: 300)")
    add("--exit-timeout", type=float, default=60.0,
        help="seconds the server may take to exit after SIGTERM (default: 60)")
    add("--seed", type=int, default=0, help="seed for prompts and frames (default: 0)")
    add("--json", nargs="?", const="-", metavar="PATH",
        help="write the JSON record to PATH; without PATH, print only the JSON record on "
             "stdout (the report goes to stderr)")
    args = parser.parse_args(argv)
    if args.short:
        args.duration = 60.0
    if args.warmup is None:
        args.warmup = 10.0 if args.short else 30.0
    return args


def main() -> int:
    args = parse_args()
    record = trio.run(soak_main, args)
    print_report(record, sys.stderr if args.json == "-" else sys.stdout)
    print(json.dumps(record), flush=True)
    if args.json not in (None, "-"):
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
