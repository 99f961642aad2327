"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Each request launches the built-in `text-completion` inferlet, exactly as a client program would
be launched, so the API exercises the same path (runtime, control, executor) as every other
program. Chat requests are rendered with the model's own chat template here and passed to the
inferlet as a raw prompt; the inferlet streams text with `send` and stops at the model's stop
tokens, after `max_tokens`, or at the earliest of the request's stop strings (each passed as its
own `--stop`). The inferlet holds back text that might begin a stop string and never sends the
stop string itself, so what arrives here is the response text as it is.

Clients do not get to stall the event loop: a chat holds at most `max_chat_messages` messages,
and templates, long prompts and large bodies are processed in worker threads (a few at a time,
`state.cpu_limiter`). Running out of KV pages is the server being busy, not failing: 503 with
Retry-After, like the instance limits.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from pie_trio import protocol
from pie_trio.protocol import ProtocolError
from pie_trio.server.exchange import HttpError, HttpExchange, Route, require_tenant
from pie_trio.server.state import Running, ServerState

log = logging.getLogger("pie_trio.server.openai")

PROGRAM = "text-completion"
DEFAULT_MAX_TOKENS = {False: 16, True: 512}  # OpenAI's completions default; chat: generous
MAX_STOP_STRINGS = 4
END_TIMEOUT = 5.0  # seconds to wait for an abandoned instance to report its end
LONG_TEXT = 8192  # characters: longer prompts are tokenized off the trio thread
# What an instance's end says when the KV pool (or the tenant's share of it) was exhausted:
# the control layer's documented refusal, passed through the inferlet's error (docs/control.md).
OUT_OF_CAPACITY = ("out of KV pages", "out of embedding slots")
STDERR_TAIL = 1024  # characters of an instance's stderr kept to explain its failure
BUSY_REASONS = ("evicted",)  # ended by the server (shutting down): retry elsewhere or later

Number = TypeVar("Number", int, float)
Default = TypeVar("Default")


def routes(state: ServerState) -> dict[tuple[str, str], Route]:
    """The API's routes, by (method, path), for the app's route table."""

    async def chat(exchange: HttpExchange) -> None:
        await completions(state, exchange, chat=True)

    async def complete(exchange: HttpExchange) -> None:
        await completions(state, exchange, chat=False)

    async def list_models(exchange: HttpExchange) -> None:
        await models(state, exchange)

    return {("GET", "/v1/models"): list_models, ("POST", "/v1/completions"): complete,
            ("POST", "/v1/chat/completions"): chat}


# ---------------------------------------------------------------------------------------------
# Request parsing


@dataclass
class Params:
    prompt: str  # for chat: rendered from `messages` by render_chat
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    messages: list[dict[str, str]] | None = None  # chat only, validated, not yet rendered

    def args(self) -> list[str]:
        # Texts go as `--name=TEXT`, one argument each, so a prompt or stop string that looks
        # like one of the inferlet's options (`--chat`) is never read as that option.
        args = [f"--prompt={self.prompt}", "--max-tokens", str(self.max_tokens),
                "--temperature", repr(self.temperature), "--top-p", repr(self.top_p)]
        args += [f"--stop={stop}" for stop in self.stop]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        if self.ignore_eos:
            args.append("--ignore-eos")
        return args


def parse_params(body: Any, state: ServerState, chat: bool) -> Params:
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != state.model_info.name:
        raise HttpError(404, f"model {model!r} does not exist; this server serves "
                             f"{state.model_info.name!r}", "not_found_error")
    messages = _chat_messages(body, state.config.max_chat_messages) if chat else None
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    params = Params(
        prompt="" if chat else _completion_prompt(body),
        messages=messages,
        max_tokens=_number(body, key, int, DEFAULT_MAX_TOKENS[chat], low=1,
                           high=state.model_info.max_position),
        temperature=_number(body, "temperature", float, 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", float, 1.0, low=1e-6, high=1.0),
        seed=_number(body, "seed", int, None, low=0, high=2**63 - 1),
        stop=_stop(body.get("stop")),
        stream=bool(body.get("stream", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    options = body.get("stream_options") or {}
    params.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    if _number(body, "n", int, 1, low=1, high=1) != 1:
        raise HttpError(400, "only n=1 is supported")
    _refuse_unimplemented(body, chat)
    return params


# Parameters this server implements, by endpoint; `user` is metadata and needs nothing.
_IMPLEMENTED = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                          "stream_options", "ignore_eos", "user", "n"})
_IMPLEMENTED_BY_ENDPOINT = {True: frozenset({"messages", "max_completion_tokens"}),
                            False: frozenset({"prompt"})}
# Parameters accepted only at the value that asks for nothing: the answer a client gets is then
# exactly what it asked for. Any other value is refused rather than silently ignored.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
    "tools": ((),), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},), "frequency_penalty": (0,), "presence_penalty": (0,),
    "logit_bias": ({},), "suffix": ("",), "store": (False,), "metadata": ({},),
}


def _refuse_unimplemented(body: dict[str, Any], chat: bool) -> None:
    """A 400 naming the first parameter this server would otherwise ignore."""
    for key, value in body.items():
        if key in _IMPLEMENTED or key in _IMPLEMENTED_BY_ENDPOINT[chat]:
            continue
        if key in _NEUTRAL:
            neutral = _NEUTRAL[key]
            if value is None or value in neutral or (isinstance(value, list) and not value):
                continue
            raise HttpError(400, f"{key}={json.dumps(value)[:80]} is not supported by this "
                                 "server; leave it out (or at its default) to get plain text")
        raise HttpError(400, f"unknown or unsupported parameter {key!r} for "
                             f"{'/v1/chat/completions' if chat else '/v1/completions'}")


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HttpError(400, "'prompt' must be a string (one prompt per request)")
    return prompt


def _chat_messages(body: dict[str, Any], limit: int) -> list[dict[str, str]]:
    """The chat's messages as {role, content} strings, checked but not rendered."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list")
    if len(messages) > limit:
        raise HttpError(400, f"'messages' holds {len(messages)} messages; this server "
                             f"accepts at most {limit} (max_chat_messages)")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, "each message needs a string 'role'")
        plain.append({"role": message["role"], "content": _content_text(message.get("content"))})
    return plain


async def render_chat(state: ServerState, params: Params) -> None:
    """Render the chat's messages into `params.prompt` with the model's template, in a worker
    thread: a template over many or long messages takes long enough to stall everyone."""
    assert params.messages is not None
    messages = params.messages

    def render() -> str:
        return state.tokenizer.render_chat(messages, add_generation_prompt=True)

    try:
        params.prompt = await trio.to_thread.run_sync(render, limiter=state.cpu_limiter)
    except Exception as exc:
        raise HttpError(400, f"the chat template rejected these messages: {exc}") from None


def _content_text(content: Any) -> str:
    """Message content as text: a string, or a list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise HttpError(400, "message 'content' must be a string or a list of text parts")


def _number(body: dict[str, Any], key: str, kind: type[Number], default: Default, low: float,
            high: float) -> Number | Default:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and not float(value).is_integer()):
        raise HttpError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}")
    if not low <= value <= high:
        raise HttpError(400, f"'{key}' must be between {low} and {high}")
    return kind(value)


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise HttpError(400, f"'stop' must be a string or a list of at most "
                             f"{MAX_STOP_STRINGS} non-empty strings")
    return stops


# ---------------------------------------------------------------------------------------------
# Generation: one text-completion instance, its text stream and its end


class Generation:
    """Runs one instance and hands its text to a callback as it streams.

    Afterwards `finish_reason` is "stop" or "length" and the token counts are set. The inferlet
    streams pieces of text, not tokens, so the completion's tokens are counted by encoding the
    text it produced (exact unless the model emitted a non-canonical tokenization)."""

    def __init__(self, state: ServerState, params: Params, tenant: str, prompt_tokens: int):
        self.state = state
        self.params = params
        self.tenant = tenant
        self.prompt_tokens = prompt_tokens
        self.finish_reason = "stop"
        self.text = ""  # everything released to the client
        self.completion_tokens = 0
        self.stderr = ""  # the tail of the instance's stderr: the SDK prints its error there
        self._running: Running | None = None

    def _count_tokens(self) -> None:
        self.completion_tokens = len(self.state.tokenizer.encode(self.text)) if self.text else 0

    async def run(self, on_text: Callable[[str], Awaitable[None]]) -> None:
        try:
            self._running = await self.state.launch(PROGRAM, self.params.args(), self.tenant,
                                                    "http")
        except ProtocolError as exc:
            # Busy or draining: retry later (503). Anything else means the built-in is broken.
            busy = exc.code in (protocol.LIMIT, protocol.DRAINING)
            raise HttpError(503 if busy else 500, exc.message,
                            "overloaded_error" if busy else "server_error") from None
        try:
            async for payload in self._running.instance.events:
                kind = payload.get("event")
                if kind == "message":
                    await self._release(str(payload.get("message", "")), on_text)
                elif kind == "stderr":
                    self.stderr = (self.stderr + str(payload.get("data", "")))[-STDERR_TAIL:]
                elif kind == "terminated":
                    self._ended(payload)
                    break
        finally:
            self._count_tokens()
            with trio.CancelScope(shield=True):
                await self._abandon()

    async def _release(self, text: str, on_text: Callable[[str], Awaitable[None]]) -> None:
        if text:
            self.text += text
            await on_text(text)

    def _ended(self, payload: dict[str, Any]) -> None:
        assert self._running is not None
        reason = payload.get("reason")
        self.state.ended(self._running.id, str(reason))
        self._running = None
        if reason != "finished":
            raise _failure(str(reason), str(payload.get("detail", "")), self.stderr)
        self._count_tokens()
        at_limit = self.completion_tokens >= self.params.max_tokens
        self.finish_reason = "length" if at_limit else "stop"

    async def _abandon(self) -> None:
        """End the instance if it still runs, and consume its remaining events."""
        if self._running is None:
            return
        running, self._running = self._running, None
        running.instance.kill("killed")
        reason = "killed"
        with trio.move_on_after(END_TIMEOUT):
            async for payload in running.instance.events:
                if payload.get("event") == "terminated":
                    reason = str(payload.get("reason"))
                    break
        self.state.ended(running.id, reason)


def _failure(reason: str, detail: str, stderr: str) -> HttpError:
    """The HTTP error for an instance that did not finish: 503 (retry later) when the server
    was out of capacity or ended it, 500 otherwise. The inferlet reports a failed call on its
    stderr (the SDK prints `error: ...` and exits 1), so that is where out-of-pages shows."""
    said = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    what = f"{reason}: {detail}" + (f" ({said})" if said else "")
    if reason in BUSY_REASONS or any(words in detail + said for words in OUT_OF_CAPACITY):
        return HttpError(503, f"the server is busy: {what}; retry later", "overloaded_error")
    return HttpError(500, f"generation failed: {what}", "server_error")


# ---------------------------------------------------------------------------------------------
# Endpoints


async def models(state: ServerState, exchange: HttpExchange) -> None:
    require_tenant(state.auth, exchange)
    created = int(time.time())
    await exchange.respond_json(200, {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": created, "owned_by": "pie-trio",
         "max_model_len": m["max_position"]} for m in state.models()]})


async def completions(state: ServerState, exchange: HttpExchange, chat: bool) -> None:
    owner = require_tenant(state.auth, exchange)
    started = time.perf_counter()
    params = parse_params(await exchange.json_body(), state, chat)
    if chat:
        await render_chat(state, params)
    prompt_tokens = await count_tokens(state, params.prompt)
    context = state.model_info.max_position
    if prompt_tokens + params.max_tokens > context:
        raise HttpError(400, f"this model's context is {context} tokens: the prompt has "
                             f"{prompt_tokens} and max_tokens asks for {params.max_tokens}")
    generation = Generation(state, params, owner, prompt_tokens)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    timer = _TokenTimer(state, endpoint, started)
    response = _Response(state, chat)
    async with _cancel_on_disconnect(exchange):
        if params.stream:
            await _stream(exchange, generation, response, timer)
        else:
            text: list[str] = []

            async def collect(piece: str) -> None:
                timer.piece()
                text.append(piece)

            await generation.run(collect)
            await exchange.respond_json(200, response.whole("".join(text), generation))
    timer.done(generation)


async def count_tokens(state: ServerState, text: str) -> int:
    """Tokens in `text`; long texts are encoded in a worker thread to keep the loop responsive."""
    if len(text) < LONG_TEXT:
        return len(state.tokenizer.encode(text))
    return len(await trio.to_thread.run_sync(state.tokenizer.encode, text,
                                             limiter=state.cpu_limiter))


async def _stream(exchange: HttpExchange, generation: Generation, response: _Response,
                  timer: _TokenTimer) -> None:
    started = False

    async def start() -> None:
        nonlocal started
        if not started:
            started = True
            await exchange.start_stream("text/event-stream")
            await _sse(exchange, response.first_chunk())

    async def forward(piece: str) -> None:
        await start()
        timer.piece()
        await _sse(exchange, response.chunk(piece))

    try:
        await generation.run(forward)
    except Exception as exc:
        if not started:
            raise  # still time for a proper HTTP error
        log.warning("stream failed error=%s", exc)
        await _sse(exchange, {"error": {"message": str(exc), "type": "server_error"}})
        await exchange.stream(b"data: [DONE]\n\n", more=False)
        return
    await start()
    await _sse(exchange, response.last_chunk(generation.finish_reason))
    if generation.params.include_usage:
        await _sse(exchange, response.usage_chunk(generation))
    await exchange.stream(b"data: [DONE]\n\n", more=False)


async def _sse(exchange: HttpExchange, value: dict[str, Any]) -> None:
    await exchange.stream(b"data: " + json.dumps(value).encode() + b"\n\n")


@asynccontextmanager
async def _cancel_on_disconnect(exchange: HttpExchange) -> AsyncIterator[None]:
    """Runs the body, cancelling it if the HTTP client disconnects (the generation's cleanup then
    ends its instance); a disconnect surfaces as HttpError 499 so nothing more is sent."""
    gone = False
    try:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                await exchange.wait_disconnect()
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            yield
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The body's own error, wrapped by the nursery: re-raise it as it was.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if gone:
        raise HttpError(499, "client went away")


class _Response:
    """The OpenAI response objects of one request."""

    def __init__(self, state: ServerState, chat: bool):
        self.chat = chat
        self.model = state.model_info.name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        return {**self._base(self.object), "choices": [self._choice(text, generation.finish_reason,
                                                                    delta=False)],
                "usage": _usage(generation)}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [choice]}

    def first_chunk(self) -> dict[str, Any]:
        if self.chat:
            return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None})
        return self._chunk(self._choice("", None, delta=True))

    def chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(self._choice(text, None, delta=True))

    def last_chunk(self, finish: str) -> dict[str, Any]:
        return self._chunk(self._choice(None, finish, delta=True))

    def usage_chunk(self, generation: Generation) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": _usage(generation)}


def _usage(generation: Generation) -> dict[str, int]:
    return {"prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


class _TokenTimer:
    """Observes time to first token, inter-token latency and request latency."""

    def __init__(self, state: ServerState, endpoint: str, started: float):
        self.metrics = state.metrics
        self.endpoint = endpoint
        self.started = started
        self.last: float | None = None

    def piece(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.time_to_first_token.labels(self.endpoint).observe(now - self.started)
        else:
            self.metrics.inter_token_latency.labels(self.endpoint).observe(now - self.last)
        self.last = now

    def done(self, generation: Generation) -> None:
        self.metrics.request_latency.labels(self.endpoint).observe(
            time.perf_counter() - self.started)
        self.metrics.prompt_tokens.inc(generation.prompt_tokens)
        self.metrics.completion_tokens.inc(generation.completion_tokens)
