"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Each request launches the built-in `openai-completion` inferlet, exactly as a client program
would be launched, so the API exercises the same path (runtime, control, executor) as every
other program. The request is read into `Params` (openai_params), chats are rendered with the
model's own template (openai_tools), and the inferlet gets the request as one JSON argument.
It fills the prompt once, forks it for `n` > 1 choices, steps the choices together, and sends
one JSON message per step and choice: `{"choice", "text", "logprobs"}` and at the end
`{"choice", "finish", "tokens"}`. It holds back text that might begin a stop string and never
sends the stop string itself. The responses are shaped by openai_response.

Clients do not get to stall the event loop: a chat holds at most `max_chat_messages` messages,
and templates, long prompts and large bodies are processed in worker threads (a few at a time,
`state.cpu_limiter`). Running out of KV pages is the server being busy, not failing: 503 with
Retry-After, like the instance limits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from pie_trio import protocol
from pie_trio.protocol import ProtocolError
from pie_trio.server.exchange import HttpError, HttpExchange, Route, require_tenant
from pie_trio.server.openai_params import Params, parse_params
from pie_trio.server.openai_response import Choice, Response, Update, Usage
from pie_trio.server.openai_tools import render_chat
from pie_trio.server.state import Running, ServerState

log = logging.getLogger("pie_trio.server.openai")

PROGRAM = "openai-completion"
END_TIMEOUT = 5.0  # seconds to wait for an abandoned instance to report its end
LONG_TEXT = 8192  # characters: longer prompts are tokenized off the trio thread
# What an instance's end says when the KV pool (or the tenant's share of it) was exhausted:
# the control layer's documented refusal, passed through the inferlet's error (docs/control.md).
OUT_OF_CAPACITY = ("out of KV pages", "out of embedding slots")
# The host's refusal of a grammar (an invalid JSON schema): the request's fault, a 400.
GRAMMAR_REFUSED = "grammar_compile"
STDERR_TAIL = 1024  # characters of an instance's stderr kept to explain its failure
BUSY_REASONS = ("evicted",)  # ended by the server (shutting down): retry elsewhere or later

OnUpdate = Callable[[Update, Choice], Awaitable[None]]


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
# Generation: one openai-completion instance, its choices' messages and its end


class Generation:
    """Runs one instance and hands each choice's updates to a callback as they stream.

    Afterwards every choice has its text, its finish reason ("stop" or "length") and its token
    count, as the inferlet counted them."""

    def __init__(self, state: ServerState, params: Params, tenant: str, prompt_tokens: int):
        self.state = state
        self.params = params
        self.tenant = tenant
        self.choices = [Choice(i, logprobs=None if params.logprobs is None else [])
                        for i in range(params.n)]
        self.usage = Usage(prompt_tokens)
        self.stderr = ""  # the tail of the instance's stderr: the SDK prints its error there
        self._running: Running | None = None

    async def run(self, on_update: OnUpdate) -> None:
        try:
            self._running = await self.state.launch(PROGRAM, [self.params.spec()], self.tenant,
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
                    await self._take(str(payload.get("message", "")), on_update)
                elif kind == "stderr":
                    self.stderr = (self.stderr + str(payload.get("data", "")))[-STDERR_TAIL:]
                elif kind == "terminated":
                    self._ended(payload)
                    break
        finally:
            self.usage.completion_tokens = sum(choice.tokens for choice in self.choices)
            with trio.CancelScope(shield=True):
                await self._abandon()

    async def _take(self, message: str, on_update: OnUpdate) -> None:
        """Apply one inferlet message to its choice and pass it on."""
        try:
            fields = json.loads(message)
            choice = self.choices[fields["choice"]]
        except (ValueError, KeyError, IndexError, TypeError):
            raise HttpError(500, f"the inferlet sent a malformed message: {message[:200]!r}",
                            "server_error") from None
        update = Update(choice.index, fields.get("text", ""), fields.get("logprobs"),
                        fields.get("finish"))
        choice.text += update.text
        if update.logprobs is not None and choice.logprobs is not None:
            choice.logprobs.extend(update.logprobs)
        if update.finish_reason is not None:
            choice.finish_reason = update.finish_reason
            choice.tokens = int(fields.get("tokens", 0))
        await on_update(update, choice)

    def _ended(self, payload: dict[str, Any]) -> None:
        assert self._running is not None
        reason = payload.get("reason")
        self.state.ended(self._running.id, str(reason))
        self._running = None
        if reason != "finished":
            raise _failure(str(reason), str(payload.get("detail", "")), self.stderr)
        for choice in self.choices:
            if choice.finish_reason is None:  # cannot happen with the shipped inferlet
                raise HttpError(500, f"the inferlet never finished choice {choice.index}",
                                "server_error")

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
    """The HTTP error for an instance that did not finish: 400 for a schema the grammar
    compiler refused, 503 (retry later) when the server was out of capacity or ended it, 500
    otherwise. The inferlet reports a failed call on its stderr (the SDK prints `error: ...`
    and exits 1), so that is where out-of-pages shows."""
    said = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if GRAMMAR_REFUSED in said:
        return HttpError(400, f"response_format: the schema was refused: {said}")
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
    response = Response(chat, state.model_info.name, tools=params.tools is not None)
    async with _cancel_on_disconnect(exchange):
        if params.stream:
            await _stream(exchange, generation, response, timer)
        else:

            async def collect(update: Update, choice: Choice) -> None:
                if update.text:
                    timer.piece()

            await generation.run(collect)
            await exchange.respond_json(200, response.whole(generation.choices,
                                                            generation.usage))
    timer.done(generation.usage)


async def count_tokens(state: ServerState, text: str) -> int:
    """Tokens in `text`; long texts are encoded in a worker thread to keep the loop responsive."""
    if len(text) < LONG_TEXT:
        return len(state.tokenizer.encode(text))
    return len(await trio.to_thread.run_sync(state.tokenizer.encode, text,
                                             limiter=state.cpu_limiter))


async def _stream(exchange: HttpExchange, generation: Generation, response: Response,
                  timer: _TokenTimer) -> None:
    started = False

    async def start() -> None:
        nonlocal started
        if not started:
            started = True
            await exchange.start_stream("text/event-stream")
            for chunk in response.first_chunks(generation.params.n):
                await _sse(exchange, chunk)

    async def forward(update: Update, choice: Choice) -> None:
        chunk = response.chunk(update, choice)
        if chunk is None:
            return
        await start()
        if update.text:
            timer.piece()
        await _sse(exchange, chunk)

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
    if generation.params.include_usage:
        await _sse(exchange, response.usage_chunk(generation.usage))
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

    def done(self, usage: Usage) -> None:
        self.metrics.request_latency.labels(self.endpoint).observe(
            time.perf_counter() - self.started)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.completion_tokens.inc(usage.completion_tokens)
