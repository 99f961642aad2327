"""The msgpack-over-TCP front-end: 4-byte big-endian length prefix, then one msgpack map.

The same protocol as the WebSocket, for clients that want less overhead. A frame that announces
more than `max_frame_size` bytes is answered with a `too_large` error and the connection is
closed, since the stream cannot be resynchronised without reading the oversized payload. A
frame that has begun must be complete within `frame_timeout` seconds (else a `timeout` error
and the connection is closed), and a peer address may hold at most `max_connections_per_peer`
connections (`max_connections` in all, WebSockets included): one more is told why (code 1013)
and closed before any of its bytes are read.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import trio

from pie_trio import protocol
from pie_trio.protocol import FrameBuffer, FrameTooLarge, ProtocolError
from pie_trio.server.sessions import (
    CLOSE_POLICY,
    CLOSE_TOO_LARGE,
    CLOSE_TRY_LATER,
    Session,
    Violation,
)
from pie_trio.server.state import ServerState

log = logging.getLogger("pie_trio.server.tcp")

RECEIVE_SIZE = 65536
TURN_AWAY_TIMEOUT = 1.0  # seconds a refused connection gets to read why it is refused


class TcpTransport:
    def __init__(self, stream: trio.SocketStream, max_frame_size: int, frame_timeout: float):
        self.stream = stream
        self.frames = FrameBuffer(max_frame_size)
        self.frame_timeout = frame_timeout
        self.ready: deque[bytes] = deque()
        self._frame_started: float | None = None  # when the unfinished frame's bytes began

    async def receive(self) -> bytes | None:
        while not self.ready:
            deadline = math.inf
            if self._frame_started is not None:
                deadline = self._frame_started + self.frame_timeout
            with trio.move_on_at(deadline):
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not data:
                    return None  # EOF; an unfinished frame is simply dropped
                self._feed(data)
                continue
            raise Violation(protocol.TIMEOUT, f"a frame did not complete within "
                            f"{self.frame_timeout:g} s; closing the connection", CLOSE_POLICY)
        return self.ready.popleft()

    def _feed(self, data: bytes) -> None:
        try:
            frames = self.frames.feed(data)
        except FrameTooLarge as exc:
            raise Violation(protocol.TOO_LARGE, f"{exc}; closing the connection",
                            CLOSE_TOO_LARGE) from None
        self.ready.extend(frames)
        # A slow sender keeps its frame's original start: trickling bytes does not reset it.
        if not self.frames.pending:
            self._frame_started = None
        elif frames or self._frame_started is None:
            self._frame_started = trio.current_time()

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

    async def abort(self) -> None:
        # Closing the socket wakes a send_all blocked on a client that does not read.
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
    except OSError:
        host, port = "?", 0
    async with stream:
        try:
            state.connections.admit(host)
        except ProtocolError as exc:
            await _turn_away(state, stream, exc)
            return
        try:
            transport = TcpTransport(stream, state.config.max_frame_size,
                                     state.config.frame_timeout)
            await Session(state, transport, "tcp", f"{host}:{port}").run()
        finally:
            state.connections.release(host)


async def _turn_away(state: ServerState, stream: trio.SocketStream, exc: ProtocolError) -> None:
    """Tell a connection over a cap why it is closed (briefly: it is not served)."""
    log.info("tcp connection refused error=%s", exc.message)
    state.metrics.protocol_errors.labels(exc.code).inc()
    goodbye = [protocol.error(exc.code, exc.message),
               {"type": "close", "code": CLOSE_TRY_LATER, "reason": exc.message}]
    with trio.move_on_after(TURN_AWAY_TIMEOUT):
        try:
            await stream.send_all(b"".join(protocol.frame(protocol.pack(m)) for m in goodbye))
            await stream.send_eof()
            # Read (and drop) what the client sent meanwhile, until it closes: closing with
            # unread bytes would reset the connection and could lose the goodbye.
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
