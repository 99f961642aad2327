"""Client-side transports: msgpack messages over a WebSocket (ws://, wss://) or TCP (tcp://)."""

from __future__ import annotations

import ssl
from typing import Protocol
from urllib.parse import urlsplit

import trio
import trio_websocket

from pie_trio.protocol import FrameBuffer, FrameTooLarge, frame

MAX_MESSAGE_SIZE = 64 * 2**20  # what the client accepts from the server
RECEIVE_SIZE = 65536


class ConnectionClosed(Exception):
    """The connection ended; `code` and `reason` say why when the server told us."""

    def __init__(self, code: int | None = None, reason: str = ""):
        super().__init__(f"connection closed ({code}): {reason}" if code else
                         f"connection closed{': ' + reason if reason else ''}")
        self.code = code
        self.reason = reason


class Transport(Protocol):
    async def send(self, message: bytes) -> None: ...

    async def receive(self) -> bytes:
        """The next message; raises ConnectionClosed at the end."""
        ...

    async def aclose(self) -> None: ...


class WebSocketTransport:
    def __init__(self, connection: trio_websocket.WebSocketConnection):
        self.connection = connection

    async def send(self, message: bytes) -> None:
        try:
            await self.connection.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self) -> bytes:
        try:
            message = await self.connection.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None
        if isinstance(message, str):
            raise ConnectionClosed(reason="the server sent a text frame")
        return message

    async def aclose(self) -> None:
        await self.connection.aclose()


def _closed(exc: trio_websocket.ConnectionClosed) -> ConnectionClosed:
    reason = exc.reason
    return ConnectionClosed(reason.code if reason else None, (reason.reason or "") if reason
                            else "")


class TcpTransport:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.frames = FrameBuffer(MAX_MESSAGE_SIZE)
        self.ready: list[bytes] = []
        self.send_lock = trio.Lock()  # several tasks may send; a stream takes one writer

    async def send(self, message: bytes) -> None:
        async with self.send_lock:
            try:
                await self.stream.send_all(frame(message))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(reason=str(exc)) from None

    async def receive(self) -> bytes:
        while not self.ready:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(reason=str(exc)) from None
            if not data:
                raise ConnectionClosed(reason="the server closed the connection")
            try:
                self.ready.extend(self.frames.feed(data))
            except FrameTooLarge as exc:
                raise ConnectionClosed(reason=str(exc)) from None
        return self.ready.pop(0)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_transport(url: str, nursery: trio.Nursery,
                         extra_headers: list[tuple[bytes, bytes]] | None = None) -> Transport:
    """Connect to `url`: ws://host:port[/ws], wss://..., or tcp://host:port."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        if not parts.hostname or not parts.port:
            raise ValueError(f"a TCP server URL needs a host and port: {url!r}")
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        return TcpTransport(stream)
    if parts.scheme in ("ws", "wss"):
        if parts.path in ("", "/"):
            url = parts._replace(path="/ws").geturl()
        context = ssl.create_default_context() if parts.scheme == "wss" else None
        connection = await trio_websocket.connect_websocket_url(
            nursery, url, context, extra_headers=extra_headers,
            max_message_size=MAX_MESSAGE_SIZE, receive_buffer_size=RECEIVE_SIZE)
        return WebSocketTransport(connection)
    raise ValueError(f"unsupported server URL {url!r}: use ws://, wss:// or tcp://")
