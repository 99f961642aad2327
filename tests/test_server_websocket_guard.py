"""The WebSocket guard closing a connection while the app is still writing to it: the close
frame cannot be sent then (trio refuses a second concurrent sender on one stream), and that must
end this connection only, never escape and end the server."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypercorn.protocol.events import StreamClosed

from pie_trio.server.websocket import GuardedWSStream


def stream_whose_close_frame_fails(error: Exception) -> tuple[GuardedWSStream, list[Any]]:
    stream = GuardedWSStream.__new__(GuardedWSStream)  # only the fields _fail touches
    seen: list[Any] = []

    async def send_event(event: Any) -> None:
        raise error

    async def send(event: Any) -> None:
        seen.append(event)

    async def app_put(message: Any) -> None:
        seen.append(message)

    stream.closed = False
    stream.stream_id = 1
    stream._send_wsproto_event = send_event  # type: ignore[method-assign]
    stream.send = send  # type: ignore[method-assign]
    stream.app_put = app_put
    return stream, seen


@pytest.mark.parametrize("error", [
    trio.BusyResourceError("another task is currently sending data on this SocketStream"),
    trio.BrokenResourceError(), trio.ClosedResourceError()])
async def test_a_close_frame_that_cannot_be_sent_still_drops_only_this_connection(error):
    stream, seen = stream_whose_close_frame_fails(error)
    await stream._fail(1008, "timeout", "a message did not complete within 1 s")
    assert stream.closed
    assert isinstance(seen[0], StreamClosed)
    assert seen[1]["type"] == "websocket.disconnect" and seen[1]["code"] == 1008
