"""The ASGI application hypercorn serves: /ws, /v1/*, /health, /metrics.

Plain ASGI with a small route table: six routes do not need a framework. The app holds no state
of its own; everything lives in the ServerState that `serve` builds and passes in.

With auth on, /health and /metrics answer without a key only if `public_health` /
`public_metrics` say so (defaults: health public, for load balancers; metrics private). A
WebSocket over the connection caps is refused with HTTP 503 before the upgrade.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pie_trio.protocol import ProtocolError
from pie_trio.server import openai_api
from pie_trio.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pie_trio.server.sessions import Session
from pie_trio.server.state import ServerState
from pie_trio.server.websocket import WebSocketTransport

log = logging.getLogger("pie_trio.server.http")

RETRY_AFTER = 1  # seconds, in the Retry-After header of every 503
BIG_BODY = 256 * 1024  # bytes: larger JSON bodies are parsed in a worker thread

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpError(Exception):
    """An HTTP error answered as an OpenAI-style JSON error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def headers(self) -> list[tuple[bytes, bytes]]:
        # A 503 is always temporary here (busy, out of KV pages, draining): say when to retry.
        return [(b"retry-after", str(RETRY_AFTER).encode())] if self.status == 503 else []


class HttpExchange:
    """One HTTP request and its response, over raw ASGI."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, max_body: int,
                 limiter: trio.CapacityLimiter | None = None):
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                        for k, v in scope.get("headers", [])}
        self._receive = receive
        self._send = send
        self._max_body = max_body
        self._limiter = limiter
        self.status: int | None = None

    async def json_body(self) -> Any:
        body = await self._body()
        try:
            if len(body) < BIG_BODY:
                return json.loads(body)
            return await trio.to_thread.run_sync(json.loads, body, limiter=self._limiter)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "the request body is not valid JSON") from None

    async def _body(self) -> bytearray:
        announced = self.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > self._max_body:  # refuse before reading
            raise HttpError(413, f"request body exceeds {self._max_body} bytes")
        body = bytearray()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise HttpError(499, "client went away")
            body += message.get("body", b"")
            if len(body) > self._max_body:
                raise HttpError(413, f"request body exceeds {self._max_body} bytes")
            if not message.get("more_body"):
                return body

    async def wait_disconnect(self) -> None:
        """Return once the client has gone (only meaningful after the body was read)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def respond(self, status: int, body: bytes, content_type: str,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    async def respond_json(self, status: int, value: Any) -> None:
        await self.respond(status, json.dumps(value).encode(), "application/json")

    async def start_stream(self, content_type: str) -> None:
        self.status = 200
        await self._send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", content_type.encode()), (b"cache-control", b"no-cache")]})

    async def stream(self, chunk: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def respond_error(self, error: HttpError) -> None:
        body = {"error": {"message": error.message, "type": error.kind, "code": error.status}}
        await self.respond(error.status, json.dumps(body).encode(), "application/json",
                           error.headers())


class App:
    """The ASGI callable."""

    def __init__(self, state: ServerState):
        self.state = state
        self.routes: dict[tuple[str, str], Callable[[HttpExchange], Awaitable[None]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/v1/models"): lambda ex: openai_api.models(state, ex),
            ("POST", "/v1/completions"): lambda ex: openai_api.completions(state, ex, chat=False),
            ("POST", "/v1/chat/completions"): lambda ex: openai_api.completions(state, ex,
                                                                                 chat=True),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self.http(HttpExchange(scope, receive, send, self.state.config.max_frame_size,
                                         self.state.cpu_limiter))

    async def lifespan(self, receive: Receive, send: Send) -> None:
        # The components are started by `serve` around hypercorn; the app only acknowledges.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ---------------------------------------------------------------------------------

    async def http(self, exchange: HttpExchange) -> None:
        route = self.routes.get((exchange.method, exchange.path))
        try:
            if route is None:
                if any(path == exchange.path for _, path in self.routes):
                    raise HttpError(405, f"{exchange.method} is not allowed on {exchange.path}")
                raise HttpError(404, f"no route {exchange.path}")
            await route(exchange)
        except HttpError as exc:
            if exchange.status is None and exc.status != 499:
                await exchange.respond_error(exc)
        except Exception:
            log.exception("request failed path=%s", exchange.path)
            if exchange.status is None:
                await exchange.respond_error(HttpError(500, "internal server error",
                                                       "server_error"))
        finally:
            self.state.metrics.requests.labels(_endpoint(exchange.path),
                                               str(exchange.status or 499)).inc()

    async def health(self, exchange: HttpExchange) -> None:
        if not self.state.config.public_health:
            openai_api.tenant(self.state, exchange)
        if self.state.draining.is_set():
            await exchange.respond_json(503, {"status": "draining"})
        else:
            await exchange.respond_json(200, {"status": "ok",
                                              "instances": len(self.state.running)})

    async def metrics(self, exchange: HttpExchange) -> None:
        if not self.state.config.public_metrics:
            openai_api.tenant(self.state, exchange)
        await exchange.respond(200, self.state.metrics.render(), METRICS_CONTENT_TYPE)

    # -- WebSocket ----------------------------------------------------------------------------

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if scope["path"] != "/ws" or self.state.draining.is_set():
            await send({"type": "websocket.close", "code": 1008 if scope["path"] != "/ws"
                        else 1001})
            return
        client = scope.get("client") or ("?", 0)
        try:
            self.state.connections.admit(client[0])
        except ProtocolError as exc:
            await self._turn_away(scope, send, exc)
            return
        try:
            await self._serve_websocket(scope, receive, send, client)
        finally:
            self.state.connections.release(client[0])

    async def _serve_websocket(self, scope: Scope, receive: Receive, send: Send,
                               client: tuple[str, int]) -> None:
        await send({"type": "websocket.accept"})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        # Optional: an Authorization header authenticates at connect time; without a valid
        # one the client must send `authenticate` (when the server requires keys).
        tenant = self.state.auth.tenant_for_header(headers.get("authorization"))
        session = Session(self.state, WebSocketTransport(scope, receive, send), "ws",
                          f"{client[0]}:{client[1]}", tenant=tenant)
        await session.run()

    async def _turn_away(self, scope: Scope, send: Send, exc: ProtocolError) -> None:
        """Refuse the upgrade with an HTTP 503 that says why (a plain close if the server
        cannot send HTTP responses to WebSocket requests)."""
        log.info("websocket refused error=%s", exc.message)
        self.state.metrics.protocol_errors.labels(exc.code).inc()
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1013})
            return
        error = HttpError(503, exc.message, "overloaded_error")
        body = json.dumps({"error": {"message": error.message, "type": error.kind,
                                     "code": error.status}}).encode()
        await send({"type": "websocket.http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *error.headers()]})
        await send({"type": "websocket.http.response.body", "body": body})


def _endpoint(path: str) -> str:
    """A bounded label value: known routes by name, everything else as `other`."""
    known = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
    return path if path in known else "other"
