"""The ASGI application hypercorn serves: /ws, /v1/*, /health, /metrics.

Plain ASGI with a small route table: six routes do not need a framework. The app holds no state
of its own; everything lives in the ServerState that `serve` builds and passes in. The OpenAI
API brings its own routes (`openai_api.routes`); both build on `exchange.py`, so the API never
imports the app.

With auth on, /health and /metrics answer without a key only if `public_health` /
`public_metrics` say so (defaults: health public, for load balancers; metrics private). A
WebSocket over the connection caps is refused with HTTP 503 before the upgrade.
"""

from __future__ import annotations

import logging
from typing import cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from hypercorn.typing import Scope as HypercornScope

from pie_trio.protocol import ProtocolError
from pie_trio.server import openai_api
from pie_trio.server.asgi import Receive, Scope, Send
from pie_trio.server.exchange import HttpError, HttpExchange, Route, require_tenant
from pie_trio.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pie_trio.server.sessions import Session
from pie_trio.server.state import ServerState
from pie_trio.server.websocket import WebSocketTransport

log = logging.getLogger("pie_trio.server.http")


class App:
    """The ASGI callable."""

    def __init__(self, state: ServerState):
        self.state = state
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.metrics,
            **openai_api.routes(state),
        }

    async def __call__(self, scope: HypercornScope, receive: ASGIReceiveCallable,
                       send: ASGISendCallable) -> None:
        # hypercorn types each ASGI message as its own TypedDict; the handlers read and write
        # them as plain dicts (see asgi.py), which is what they are at run time.
        await self.dispatch(cast(Scope, scope), cast(Receive, receive), cast(Send, send))

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
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
            require_tenant(self.state.auth, exchange)
        if self.state.draining.is_set():
            await exchange.respond_json(503, {"status": "draining"})
        else:
            await exchange.respond_json(200, {"status": "ok",
                                              "instances": len(self.state.running)})

    async def metrics(self, exchange: HttpExchange) -> None:
        if not self.state.config.public_metrics:
            require_tenant(self.state.auth, exchange)
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
        body = error.body()
        await send({"type": "websocket.http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *error.headers()]})
        await send({"type": "websocket.http.response.body", "body": body})


def _endpoint(path: str) -> str:
    """A bounded label value: known routes by name, everything else as `other`."""
    known = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
    return path if path in known else "other"
