"""One HTTP request and its response over raw ASGI, and the errors answered as OpenAI-style JSON.

The app routes each request to a handler that receives an `HttpExchange`; a handler refuses a
request by raising `HttpError`, which the app answers (unless a response has begun). Both the
app's own routes and the OpenAI API build on this module, so neither imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pie_trio.server.asgi import Receive, Scope, Send
from pie_trio.server.auth import Authenticator

RETRY_AFTER = 1  # seconds, in the Retry-After header of every 503
BIG_BODY = 256 * 1024  # bytes: larger JSON bodies are parsed in a worker thread


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

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.kind,
                                     "code": self.status}}).encode()


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
        await self.respond(error.status, error.body(), "application/json", error.headers())


Route = Callable[["HttpExchange"], Awaitable[None]]  # what answers one (method, path)


def require_tenant(auth: Authenticator, exchange: HttpExchange) -> str:
    """The tenant of the request's API key; 401 without a valid one."""
    found = auth.tenant_for_header(exchange.headers.get("authorization"))
    if found is None:
        raise HttpError(401, "a valid API key is required (Authorization: Bearer KEY)",
                        "authentication_error")
    return found
