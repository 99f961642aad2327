"""The msgpack-over-TCP front-end: 4-byte big-endian length prefix, then one msgpack map.

The same protocol as the WebSocket, for clients that want less overhead. A frame that announces
more than `max_frame_size` bytes is answered with a `too_large` error and the connection is
closed, since the stream cannot be resynchronised without reading the oversized payload.
"""

from __future__ import annotations

import logging
from collections import deque

import trio

from pie_trio.server import protocol
from pie_trio.server.protocol import FrameBuffer, FrameTooLarge
from pie_trio.server.sessions import CLOSE_TOO_LARGE, Session, Violation
from pie_trio.server.state import ServerState

log = logging.getLogger("pie_trio.server.tcp")

RECEIVE_SIZE = 65536


class TcpTransport:
    def __init__(self, stream: trio.SocketStream, max_frame_size: int):
        self.stream = stream
        self.frames = FrameBuffer(max_frame_size)
        self.ready: deque[bytes] = deque()

    async def receive(self) -> bytes | None:
        while not self.ready:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None  # EOF; an unfinished frame is simply dropped
            try:
                self.ready.extend(self.frames.feed(data))
            except FrameTooLarge as exc:
                raise Violation(protocol.TOO_LARGE, f"{exc}; closing the connection",
                                CLOSE_TOO_LARGE) from None
        return self.ready.popleft()

    async def send(self, frames: list[bytes]) -> None:
        # One write for everything ready: trio sets TCP_NODELAY, so separate writes would each
        # become a packet.
        await self.stream.send_all(b"".join(protocol.frame(f) for f in frames))

    async def close(self, code: int, reason: str) -> None:
        """TCP has no close codes: a final `close` message carries the WebSocket-style code."""
        message = protocol.pack({"type": "close", "code": code, "reason": reason})
        try:
            await self.stream.send_all(protocol.frame(message))
        finally:
            await self.stream.aclose()


async def serve_tcp(state: ServerState, host: str, port: int,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept TCP clients until the server drains, then wait for their sessions to close.

    Reports the bound port through `task_status` (what port 0 picked)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(_accept_loop, listener, connections, state)
            task_status.started(bound)
            await state.draining.wait()
            acceptors.cancel_scope.cancel()  # stop accepting; sessions close themselves


async def _accept_loop(listener: trio.SocketListener, connections: trio.Nursery,
                       state: ServerState) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. EMFILE: log, back off, keep serving the others
                log.warning("tcp accept failed error=%s", exc)
                await trio.sleep(0.1)
                continue
            connections.start_soon(_serve_connection, state, stream)


async def _serve_connection(state: ServerState, stream: trio.SocketStream) -> None:
    try:
        host, port = stream.socket.getpeername()[:2]
        peer = f"{host}:{port}"
    except OSError:
        peer = "?"
    transport = TcpTransport(stream, state.config.max_frame_size)
    async with stream:
        await Session(state, transport, "tcp", peer).run()
