"""The WebSocket front-end below the ASGI app: hypercorn's WebSocket stream, hardened.

hypercorn assembles every inbound message in memory before the app sees it and checks
`websocket_max_message_size` only against what it has buffered; after refusing a message with
1009 it even keeps buffering the rest while it waits for the client's close reply. A client
could make it hold a 256 MiB message for as long as the upload took. `GuardedWSStream` reads
each frame header as the bytes arrive, before hypercorn's parser does, and:

- refuses a message as soon as the *announced* length of its frames passes the limit (the
  server's `max_frame_size`): a 1009 close frame, then the TCP connection is dropped, without
  buffering any of its payload;
- drops the connection when a message that has begun is not complete within `frame_timeout`
  seconds (1008), however slowly its bytes trickle in;
- declines permessage-deflate, so announced lengths are real lengths (no decompression bombs);
- lets the app abort the connection (the ASGI extension `pie_trio.abort`), which also wakes a
  send that is stuck on a client that does not read.

`install()` makes hypercorn's HTTP/1.1 and HTTP/2 protocols create this stream; it relies on
hypercorn 0.17–0.18 internals and refuses to start if they are missing. `WebSocketTransport` is
the session's view of one connection, over ASGI.
"""

from __future__ import annotations

import math
from typing import Any

import hypercorn.config
import trio
from hypercorn.protocol import h2, h11
from hypercorn.protocol.events import Data, Request, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.events import CloseConnection

from pie_trio import protocol
from pie_trio.server.asgi import Receive, Scope, Send
from pie_trio.server.sessions import CLOSE_POLICY, CLOSE_TOO_LARGE, CLOSE_UNSUPPORTED, Violation

ABORT = "pie_trio.abort"  # ASGI extension and message type: drop the connection now
VIOLATION = "pie_trio.violation"  # in a websocket.disconnect: the protocol error code
CLOSE_GRACE = 1.0  # seconds to send a close frame before the connection is dropped anyway

_DATA_OPCODES = (0x1, 0x2)  # text, binary; 0x0 continues a message, 0x8+ are control frames


class HypercornConfig(hypercorn.config.Config):
    """hypercorn's settings plus ours (read by GuardedWSStream)."""

    frame_timeout: float | None = None  # seconds a begun message may take to arrive


class FrameHeaders:
    """Follows the frame headers (RFC 6455 section 5.2) of one inbound byte stream without
    keeping any payload: the announced size of the message in progress, and since when a
    message (or frame) has been in progress."""

    def __init__(self) -> None:
        self.message_size = 0  # announced bytes of the data message in progress
        self.started: float | None = None  # when the unfinished message's bytes began
        self._header = bytearray()
        self._remaining = 0  # payload bytes of the current frame not yet seen
        self._opcode = 0
        self._fin = True
        self._fragmented = False  # a data message awaits its final continuation frame

    def feed(self, data: bytes, now: float) -> None:
        if data and self.started is None:
            self.started = now
        i = 0
        while i < len(data):
            if self._remaining:
                step = min(self._remaining, len(data) - i)
                i += step
                self._remaining -= step
                if not self._remaining:
                    self._frame_done()
                continue
            need = _header_length(self._header) - len(self._header)
            self._header += data[i:i + need]
            i += need
            if len(self._header) == _header_length(self._header):
                self._header_done()
        if not (self._header or self._remaining or self._fragmented):
            self.started = None

    def _header_done(self) -> None:
        header, self._header = self._header, bytearray()
        self._fin, self._opcode = bool(header[0] & 0x80), header[0] & 0x0F
        length = header[1] & 0x7F
        if length >= 126:
            width = 2 if length == 126 else 8
            length = int.from_bytes(header[2:2 + width], "big")
        if self._opcode in _DATA_OPCODES:
            self.message_size = length
            self._fragmented = not self._fin
        elif self._opcode == 0x0:
            self.message_size += length
        self._remaining = length
        if not length:
            self._frame_done()

    def _frame_done(self) -> None:
        if self._opcode in (0x0, *_DATA_OPCODES) and self._fin:
            self._fragmented = False


def _header_length(header: bytearray) -> int:
    """Bytes of a frame header that begins with `header` (2 until the length byte is known)."""
    if len(header) < 2:
        return 2
    extended = {126: 2, 127: 8}.get(header[1] & 0x7F, 0)
    return 2 + extended + (4 if header[1] & 0x80 else 0)


class GuardedWSStream(WSStream):
    """hypercorn's WebSocket stream with the checks described in the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames = FrameHeaders()
        self._frame_timeout = getattr(self.config, "frame_timeout", None) or math.inf

    async def handle(self, event: Any) -> None:
        if (isinstance(event, Data) and not self.closed
                and self.state == ASGIWebsocketState.CONNECTED):
            self._frames.feed(event.data, trio.current_time())
            limit = self.config.websocket_max_message_size
            if self._frames.message_size > limit:
                await self._fail(CLOSE_TOO_LARGE, protocol.TOO_LARGE,
                                 f"message of {self._frames.message_size} bytes exceeds the "
                                 f"limit of {limit}; closing the connection")
                return
            if self._overdue():
                await self._fail_slow()
                return
        await super().handle(event)
        if isinstance(event, Request):
            # Advertised to the app; it looks only when it wants to abort, long after this.
            self.scope["extensions"][ABORT] = {}

    async def app_send(self, message: Any) -> None:
        if message is not None and message.get("type") == ABORT:
            await self._drop()
            return
        await super().app_send(message)

    async def _accept(self, message: Any) -> None:
        self.handshake.extensions = None  # decline permessage-deflate (see the docstring)
        await super()._accept(message)
        if self._frame_timeout < math.inf:
            self.task_group.spawn(self._watch_slow_messages)

    def _overdue(self) -> bool:
        started = self._frames.started
        return started is not None and trio.current_time() - started > self._frame_timeout

    async def _watch_slow_messages(self) -> None:
        """Catch a begun message whose bytes stopped coming (handle() catches trickling)."""
        while not self.closed:
            await trio.sleep(min(self._frame_timeout / 4, 1.0))
            if self._overdue():
                await self._fail_slow()

    async def _fail_slow(self) -> None:
        await self._fail(CLOSE_POLICY, protocol.TIMEOUT, f"a message did not complete within "
                         f"{self._frame_timeout:g} s; closing the connection")

    async def _fail(self, close_code: int, error: str, reason: str) -> None:
        """Close with `close_code`, drop the connection, then tell the app why."""
        if self.closed:
            return
        with trio.move_on_after(CLOSE_GRACE):
            try:
                await self._send_wsproto_event(CloseConnection(code=close_code,
                                                               reason=_short(reason)))
            except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
                # The watcher can fire while the app is sending on the same stream (a response
                # still being written to this slow client) or after the peer went away. The
                # close frame is a courtesy; dropping the connection is what must happen, and
                # an error escaping here would end the whole server, not this connection.
                pass
        await self._drop()
        if self.app_put is not None:  # set once the app runs, which it does before any frame
            await self.app_put({"type": "websocket.disconnect", "code": close_code,
                                "reason": reason, VIOLATION: error})

    async def _drop(self) -> None:
        """Close the TCP connection now. `closed` first, so that hypercorn's own clean-up (which
        calls back into handle) neither sends anything nor waits on the app's queue."""
        if self.closed:
            return
        self.closed = True
        await self.send(StreamClosed(stream_id=self.stream_id))


def _short(reason: str) -> str:
    """A close reason may hold at most 123 bytes."""
    return reason.encode()[:120].decode(errors="ignore")


def install() -> None:
    """Make hypercorn create GuardedWSStream for every WebSocket (idempotent)."""
    for name in ("_accept", "_send_wsproto_event", "app_send", "handle"):
        if not hasattr(WSStream, name):
            raise RuntimeError(f"hypercorn's WSStream has no {name}: this hypercorn version "
                               "is not supported (pie-trio needs 0.17 or 0.18)")
    # Replacing a name hypercorn's modules import but do not export: what install() is for.
    h11.WSStream = GuardedWSStream  # type: ignore[attr-defined]
    h2.WSStream = GuardedWSStream  # type: ignore[attr-defined]


class WebSocketTransport:
    """A session's connection over ASGI WebSocket messages."""

    def __init__(self, scope: Scope, receive: Receive, send: Send):
        self._scope = scope
        self._receive = receive
        self._send = send

    async def receive(self) -> bytes | None:
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            if message.get(VIOLATION):  # GuardedWSStream refused the client's message
                raise Violation(message[VIOLATION], message.get("reason", ""), message["code"])
            return None
        if message.get("bytes") is None:
            raise Violation(protocol.MALFORMED, "text frames are not supported: send msgpack "
                            "in binary frames", CLOSE_UNSUPPORTED)
        data: bytes = message["bytes"]
        return data

    async def send(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self._send({"type": "websocket.send", "bytes": frame})

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": _short(reason)})

    async def abort(self) -> None:
        if ABORT in self._scope.get("extensions", {}):
            await self._send({"type": ABORT})
